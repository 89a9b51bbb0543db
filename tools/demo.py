"""The Shapes demo: python tools/demo.py [--out runs/shapes] [--quick]. See clipgen_jax/demo.py."""

from absl import app, flags

import clipgen_jax  # noqa: F401  (registers the Shapes TFDS builder)
from clipgen_jax import demo
from clipgen_jax.training import writer

_OUT = flags.DEFINE_string("out", "runs/shapes", "Output directory (rerunning reuses finished stages).")
_QUICK = flags.DEFINE_bool("quick", False, "A smoke run of a few minutes on the tiny Shapes build.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    writer.configure_console_logging()
    print(demo.markdown(demo.run(_OUT.value, quick=_QUICK.value)))


if __name__ == "__main__":
    app.run(main)
