"""What every benchmark shares: the host setting it runs under (recorded in its result), and one JSON line appended
to a results file, also printed."""

import json
import pathlib

from absl import flags

from clipgen_jax import host_memory

_KEEP_FREED_MEMORY = flags.DEFINE_bool(
    "keep_freed_memory", True, "As the tools do: malloc keeps freed memory (clipgen_jax/host_memory.py).")


def set_up_host() -> dict:
    """Applies --keep_freed_memory before anything is compiled; returns the fields recording it."""
    return {"malloc_keeps_freed_memory": _KEEP_FREED_MEMORY.value and host_memory.keep_freed_memory()}


def append(path: str, result: dict) -> None:
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(result) + "\n")
    print(json.dumps(result, indent=2))
