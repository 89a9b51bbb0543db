"""Reading a precomputed dataset: milliseconds of wall and CPU time per training batch, streamed vs held in memory.

  python benchmarks/precomputed_read_speed.py --data_dir=runs/precomputed --name=shapes_s32

Times `clipgen_jax.data.precomputed.make_batch_iterator` over --batches batches of --batch_size (the prior's keys:
tokens and image embeddings) from the shuffled, repeating train split, as the prior's training loop reads them:
streamed from the array_record files (memory_limit_bytes=0), and read into memory first (the default for splits
under 1 GiB; the one-off load is reported apart). On the 2 cores every millisecond of the reader's CPU is taken from
the training step. One JSON line is appended to --out with the date.
"""

import datetime
import time

import jax
from absl import app, flags

from clipgen_jax.data import precomputed

import results_file  # benchmarks/results_file.py (this script's folder is on sys.path)

_DATA_DIR = flags.DEFINE_string("data_dir", "runs/precomputed", "Precomputed datasets' directory.")
_NAME = flags.DEFINE_string("name", "shapes_s32", "Precomputed dataset name.")
_SPLIT = flags.DEFINE_string("split", "train", "Split to read.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Records per batch (the shapes prior's).")
_BATCHES = flags.DEFINE_integer("batches", 2000, "Timed batches per setting (after one untimed batch).")
_OUT = flags.DEFINE_string("out", "benchmarks/results/precomputed_read_speed.jsonl", "JSON-lines results file.")

KEYS = (precomputed.TOKENS, precomputed.IMAGE_EMBEDDING)


def _time_batches(iterator) -> dict[str, float]:
    next(iterator)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(_BATCHES.value):
        next(iterator)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    iterator.close()
    return {"wall_ms_per_batch": 1e3 * wall / _BATCHES.value, "cpu_ms_per_batch": 1e3 * cpu / _BATCHES.value}


def _make(memory_limit_bytes: int):
    return precomputed.make_batch_iterator(_DATA_DIR.value, _NAME.value, split=_SPLIT.value,
                                           batch_size=_BATCH_SIZE.value, seed=0, keys=KEYS,
                                           memory_limit_bytes=memory_limit_bytes)


def main(argv):
    del argv
    host_setting = results_file.set_up_host()
    result = {"date": datetime.date.today().isoformat(), "device": jax.devices()[0].device_kind,
              "dataset": _NAME.value, "split": _SPLIT.value, "batch_size": _BATCH_SIZE.value, **host_setting}
    result["streamed"] = _time_batches(_make(0))
    start = time.perf_counter()
    in_memory = _make(precomputed.DEFAULT_MEMORY_LIMIT_BYTES)
    result["in_memory_load_seconds"] = time.perf_counter() - start
    result["in_memory"] = _time_batches(in_memory)
    results_file.append(_OUT.value, result)


if __name__ == "__main__":
    app.run(main)
