"""Flags and start-up shared by the launch scripts: the device mesh and multi-host JAX.

  --mesh=data:4,model:2            # default: every device on the data axis
  --coordinator_address=host:port --num_processes=2 --process_id=0   # one line per process

Multi-host runs call ``jax.distributed.initialize`` before anything touches a device; on CPU
they use gloo collectives (the one global JAX setting changed, by the program's entry point,
not by the library). Before that the processes join over TCP on the coordinator's port + 1
and stay connected (:class:`_Rendezvous`): a process missing at the start, or lost during the
run, ends every other one with one line naming it and exit status 1, where JAX's coordination
service would abort natively.
"""

from absl import flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("mesh", None, "Device mesh, e.g. 'data:4,model:2' (default: every device "
                    "on 'data'); 'data' splits examples, 'model' parameters (FSDP).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for a multi-host run "
                    "(with --num_processes and --process_id).")
flags.DEFINE_integer("num_processes", None, "Processes of a multi-host run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
flags.DEFINE_integer("distributed_timeout", 120, "Seconds to wait for the other processes.")
flags.DEFINE_integer("heartbeat_timeout", 100, "Seconds without a heartbeat after which JAX's "
                     "coordination service counts a hung process of a multi-host run as lost "
                     "(a dead one is seen at once: its rendezvous connection closes).")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (``app.run(main, flags_parser=parse_flags)``), where a
    ``--config.FIELD=VALUE`` override naming no field of the config is one clear line (and
    exit status 1) instead of ml_collections' traceback."""
    import sys

    try:
        return FLAGS(argv)
    except flags.Error as e:
        sys.stderr.write(f"FATAL Flags parsing error: {e}\n"
                         "Pass --helpshort or --helpfull to see help on flags.\n")
        sys.exit(1)
    except (AttributeError, KeyError) as e:  # ml_collections: an override of no field
        bad_override(argv, FLAGS["config"].value if "config" in FLAGS else None, e)


def bad_override(argv: list[str], config, error: Exception) -> None:
    """Ends the program with one line naming the ``--config.FIELD`` override of no field of
    ``config`` (exit status 1)."""
    import sys

    overrides = [a[2:].split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
    bad = [o for o in overrides if config is not None and not _has_field(config, o)]
    sys.stderr.write(
        f"FATAL Flags parsing error: --{(bad or overrides or ['config'])[0]}: the config has "
        f"no such field ({error}); see the config file for its fields.\n")
    sys.exit(1)


def _has_field(config, dotted: str) -> bool:
    node = config
    for part in dotted.split(".")[1:]:
        try:
            node = node[part]
        except (KeyError, TypeError, IndexError):
            return False
    return True


def check_flags() -> None:
    """Raises ``ValueError`` naming the flag, before anything starts, for inconsistent
    multi-host settings."""
    given = [FLAGS.coordinator_address is not None, FLAGS.num_processes is not None,
             FLAGS.process_id is not None]
    if any(given) and not all(given):
        raise ValueError("a multi-host run needs all of --coordinator_address, --num_processes "
                         "and --process_id")
    if all(given):
        host, _, port = FLAGS.coordinator_address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--coordinator_address must be host:port, got "
                             f"{FLAGS.coordinator_address!r}")
        if FLAGS.num_processes < 1:
            raise ValueError(f"--num_processes must be >= 1, got {FLAGS.num_processes}")
        if not 0 <= FLAGS.process_id < FLAGS.num_processes:
            raise ValueError(f"--process_id must be in [0, {FLAGS.num_processes}), got "
                             f"{FLAGS.process_id}")


def exit_now(message: str, code: int = 1) -> None:
    """Writes ``message`` to stderr and ends the process at once. For a multi-host run that
    lost a peer: the normal exit runs JAX's clean-up, which waits on the dead peer and then
    aborts natively with a stack trace."""
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.write(message.rstrip() + "\n")
    sys.stderr.flush()
    os._exit(code)


def _program() -> str:
    import sys

    name = sys.argv[0] if sys.argv else ""
    return "launch." + name.rsplit("/", 1)[-1].removesuffix(".py") if name else "launch"


class _Rendezvous:
    """The processes of a multi-host run, joined and watched over plain TCP beside JAX's own
    coordination service (whose failures abort the process natively, with no word of who was
    lost).

    Before JAX starts, process 0 listens on the coordinator's port + 1 and waits for every other
    process to check in (``--distributed_timeout``): one started alone gets one line saying who
    is missing, not a native abort. The connections then stay open: when a process dies, the
    others see its socket close at once, say which process was lost, and exit with status 1
    before anything else is written (no failure record for the checkpoint in progress), well
    before JAX's heartbeat timeout. A process that ends says so first ("ok" at the end of
    ``main``, "error" from an exception), so that a finished peer is not taken for a lost one.
    """

    def __init__(self):
        self.sockets: dict[int, object] = {}  # peer process id -> socket
        self.closed = False

    def join(self) -> None:
        import socket
        import time

        host, _, port = FLAGS.coordinator_address.rpartition(":")
        port = int(port) + 1
        n, me = FLAGS.num_processes, FLAGS.process_id
        deadline = time.monotonic() + FLAGS.distributed_timeout
        if me == 0:
            server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                server.bind(("", port))
            except OSError as e:
                server.close()
                raise RuntimeError(
                    f"process 0 cannot listen on the rendezvous port {port} (the port of "
                    f"--coordinator_address={FLAGS.coordinator_address} + 1): {e}; choose "
                    "another coordinator port") from None
            server.listen(n)
            try:
                while len(self.sockets) < n - 1:
                    server.settimeout(max(0.1, deadline - time.monotonic()))
                    try:
                        conn, _ = server.accept()
                    except OSError:
                        missing = sorted(set(range(1, n)) - set(self.sockets))
                        raise RuntimeError(
                            f"process 0: process{'es' if len(missing) > 1 else ''} "
                            f"{', '.join(map(str, missing))} of {n} did not join within "
                            f"--distributed_timeout={FLAGS.distributed_timeout} s; start "
                            f"{'them' if len(missing) > 1 else 'it'} with --coordinator_address="
                            f"{FLAGS.coordinator_address} --num_processes={n}") from None
                    conn.settimeout(10.0)
                    peer = int(conn.recv(16).decode().strip() or -1)
                    if not 0 < peer < n or peer in self.sockets:
                        conn.close()
                        continue
                    self.sockets[peer] = conn
                for conn in self.sockets.values():
                    conn.sendall(b"go\n")
            finally:
                server.close()
        else:
            while True:
                try:
                    conn = socket.create_connection((host, port), timeout=2.0)
                    break
                except OSError as e:
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"no coordinator answers at --coordinator_address="
                            f"{FLAGS.coordinator_address} (its rendezvous port {port}) after "
                            f"--distributed_timeout={FLAGS.distributed_timeout} s ({e}); start "
                            "process 0 there first, or fix the address") from None
                    time.sleep(0.5)
            conn.sendall(f"{me}\n".encode())
            conn.settimeout(max(1.0, deadline - time.monotonic()) + 30.0)
            if not conn.recv(16).startswith(b"go"):
                raise RuntimeError("process 0 closed the rendezvous before every process joined")
            self.sockets[0] = conn
        for conn in self.sockets.values():
            conn.settimeout(None)
        import atexit
        import threading

        atexit.register(self.close, "error")
        for peer, conn in self.sockets.items():
            threading.Thread(target=self._watch, args=(peer, conn), daemon=True).start()

    def _watch(self, peer: int, conn) -> None:
        data = b""
        try:
            while True:
                chunk = conn.recv(64)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
        if self.closed or data.startswith(b"ok"):
            return
        what = ("ended with an error (see its log)" if data.startswith(b"error") else
                "was lost (killed, crashed or cut off)")
        exit_now(f"{_program()}: process {FLAGS.process_id}: process {peer} of "
                 f"{FLAGS.num_processes} {what}; this process stops too, writing nothing "
                 "for the checkpoint in progress. Restart every process: finished records "
                 "are reused.")

    def close(self, how: str = "ok") -> None:
        """Tells the peers this process ends (``"ok"`` or ``"error"``)."""
        if self.closed:
            return
        self.closed = True
        for conn in self.sockets.values():
            try:
                conn.sendall(how.encode() + b"\n")
                conn.close()
            except OSError:
                pass


_RENDEZVOUS = _Rendezvous()


def finished() -> None:
    """Tells the other processes of a multi-host run that this one ended normally (call it at
    the end of ``main``; without it, the exit counts as an error for them)."""
    _RENDEZVOUS.close("ok")


def initialize():
    """Starts multi-host JAX if asked, then returns the mesh of ``--mesh``."""
    check_flags()
    import jax

    from hessian_subspace import sharding

    if FLAGS.coordinator_address is not None:
        _RENDEZVOUS.join()
        # Process-wide by nature and only here, in the entry point, when several processes
        # were asked for: the CPU client picks its collectives when it is created, so no scoped
        # form exists (without it, cross-process CPU collectives fail). The library never sets it.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        try:
            jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                       num_processes=FLAGS.num_processes,
                                       process_id=FLAGS.process_id,
                                       initialization_timeout=FLAGS.distributed_timeout,
                                       heartbeat_timeout_seconds=FLAGS.heartbeat_timeout)
        except Exception as e:  # the runtime raises several types for an unreachable peer
            raise RuntimeError(
                f"could not start the multi-host run with --coordinator_address="
                f"{FLAGS.coordinator_address} (process {FLAGS.process_id} of "
                f"{FLAGS.num_processes}) within --distributed_timeout="
                f"{FLAGS.distributed_timeout} s: {type(e).__name__}: {e}") from e
    mesh = sharding.parse_mesh(FLAGS.mesh)
    logging.info("process %d of %d; %d devices (%d local); mesh %s", jax.process_index(),
                 jax.process_count(), jax.device_count(), jax.local_device_count(),
                 dict(mesh.shape))
    return mesh
