"""Flags and start-up shared by the launch scripts: the device mesh and multi-host JAX.

  --mesh=data:4,model:2            # default: every device on the data axis
  --coordinator_address=host:port --num_processes=2 --process_id=0   # one line per process

Multi-host runs call ``jax.distributed.initialize`` before anything touches a device; on CPU
they use gloo collectives (the one global JAX setting changed, by the program's entry point,
not by the library).
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
        overrides = [a[2:].split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
        config = FLAGS["config"].value if "config" in FLAGS else None
        bad = [o for o in overrides if config is not None and not _has_field(config, o)]
        sys.stderr.write(
            f"FATAL Flags parsing error: --{(bad or overrides or ['config'])[0]}: the config has "
            f"no such field ({e}); see the config file for its fields.\n")
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


def _wait_for_coordinator() -> None:
    """Waits until process 0's coordinator accepts connections (the runtime itself aborts the
    process, uncatchably, when it cannot reach it)."""
    import socket
    import time

    host, _, port = FLAGS.coordinator_address.rpartition(":")
    deadline = time.monotonic() + FLAGS.distributed_timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2.0):
                return
        except OSError as e:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"no coordinator answers at --coordinator_address="
                    f"{FLAGS.coordinator_address} after --distributed_timeout="
                    f"{FLAGS.distributed_timeout} s ({e}); start process 0 there first, or fix "
                    "the address") from None
            time.sleep(0.5)


def initialize():
    """Starts multi-host JAX if asked, then returns the mesh of ``--mesh``."""
    check_flags()
    import jax

    from hessian_subspace import sharding

    if FLAGS.coordinator_address is not None:
        if FLAGS.process_id != 0:
            _wait_for_coordinator()
        # Process-wide by nature and only here, in the entry point, when several processes
        # were asked for: the CPU client picks its collectives when it is created, so no scoped
        # form exists (without it, cross-process CPU collectives fail). The library never sets it.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        try:
            jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                       num_processes=FLAGS.num_processes,
                                       process_id=FLAGS.process_id,
                                       initialization_timeout=FLAGS.distributed_timeout)
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
