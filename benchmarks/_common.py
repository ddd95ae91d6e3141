"""What every benchmark script reports the same way: the machine, the versions, the JSON."""

from __future__ import annotations

import json
import os
import platform
import sys

import jax
import numpy as np


def _cpu() -> dict:
    """The CPU model and its widest vector ISA (from /proc/cpuinfo; empty elsewhere): absolute
    CPU timings depend on them (XLA:CPU and oneDNN use AVX-512 where it exists)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    isa = next((name for name in ("avx512f", "avx2", "avx", "sse4_2") if name in flags), None)
    return dict(cpu_model=fields.get("model name"), vector_isa=isa)


def machine() -> dict:
    """The machine and accelerator a number was measured on."""
    return dict(platform=platform.platform(), processor=platform.processor(), **_cpu(),
                cpu_count=os.cpu_count(), device=str(jax.devices()[0].device_kind),
                backend=jax.default_backend())


def versions(**extra: str) -> dict:
    """Python, jax, jaxlib and numpy versions, plus ``extra`` (e.g. scipy=scipy.__version__)."""
    jaxlib = getattr(jax.lib, "__version__", None)
    return dict(python=sys.version.split()[0], jax=jax.__version__, jaxlib=jaxlib,
                numpy=np.__version__, **extra)


def median_time(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` (blocked until ready), after one call that
    compiles and warms up."""
    import statistics
    import time

    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def emit(result: dict, json_out: str | None, quiet: bool = False) -> None:
    """Prints ``result`` as indented JSON (unless ``quiet``), and writes the same text to
    ``json_out`` if given (atomically: a run killed mid-write leaves the previous file)."""
    text = json.dumps(result, indent=1)
    if not quiet:
        print(text)
    if json_out:
        with open(json_out + ".tmp", "w") as f:
            f.write(text)
        os.replace(json_out + ".tmp", json_out)
