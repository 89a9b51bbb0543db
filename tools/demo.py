"""The Shapes demo: python tools/demo.py [--out runs/shapes] [--quick] [--clip NAME_OR_DIR | --train-clip]
[--eval-clip NAME_OR_DIR] [--compare].

Builds Shapes, trains and evaluates the VQGAN, precomputes with the CLIP, trains the prior, generates from the held-out
prompts and scores them (see clipgen_jax/demo.py); rerunning reuses finished stages.
"""

import os

from absl import app, flags

import clipgen_jax  # noqa: F401  (registers the Shapes TFDS builder)
from clipgen_jax import cli, demo, host_memory, parallel
from clipgen_jax.training import writer

_OUT = flags.DEFINE_string("out", "runs/shapes", "Output directory (rerunning reuses finished stages).")
_QUICK = flags.DEFINE_bool("quick", False, "A smoke run of a few minutes on the tiny Shapes build.")
_CLIP = flags.DEFINE_string("clip", demo.DEFAULT_CLIP, "The frozen CLIP that conditions and re-ranks: packaged name, "
                            "directory or Hub id (ignored with --train-clip).")
_EVAL_CLIP = flags.DEFINE_string("eval-clip", demo.EVAL_CLIP, "The CLIP that scores generated images (CLIP score, "
                                 "FD-CLIP); it must not be the one that conditions and re-ranks.")
_COMPARE = flags.DEFINE_bool("compare", False, "Also train and score the ablations (embedding noise, guidance) and the "
                              "text-supervised prior into one table (budget on a 2-core CPU: 90 minutes in all).")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", min(2, os.cpu_count() or 1), "Present the CPU as this many devices, "
                                    "data parallel over its cores (the VQGAN trains 1.5x faster as 2 on 2 cores).")
_TRAIN_CLIP = flags.DEFINE_bool("train-clip", False, "Train the CLIP from scratch into OUT/clip "
                                "(configs/clip.py:shapes, :tiny with --quick) and use OUT/clip/export.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    writer.configure_console_logging()
    try:
        parallel.split_cpu(_CPU_DEVICES.value)
    except ValueError as e:
        cli.fail(str(e))
    host_memory.keep_freed_memory()
    print(demo.markdown(demo.run(_OUT.value, quick=_QUICK.value, clip=_CLIP.value, train_clip=_TRAIN_CLIP.value,
                                eval_clip=_EVAL_CLIP.value, compare=_COMPARE.value)))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
