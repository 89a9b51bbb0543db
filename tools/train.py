"""Trains one stage: python tools/train.py --config=configs/<stage>.py[:preset] --workdir=DIR [--config.x.y=v].

Running the same command again resumes from the newest checkpoint in DIR.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

import clipgen_jax  # noqa: F401  (registers the Shapes TFDS builder)
from clipgen_jax import checkpointing, cli, host_memory, locking, parallel, training
from clipgen_jax.training import loop, writer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/vqgan.py:shapes.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and provenance.")
_MULTIHOST = flags.DEFINE_bool("multihost", None, "Call jax.distributed.initialize() (default: detect from env).")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", None, "Present the CPU as this many devices, data parallel over its "
                                    "cores (2 on 2 cores: the Shapes VQGAN trains 1.5x faster); no effect on GPU/TPU. "
                                    "Default: JAX's (one, or what XLA_FLAGS says).")
flags.mark_flags_as_required(["config", "workdir"])
# An empty --workdir= would otherwise train into the current directory.
flags.register_validator("workdir", lambda value: value is None or bool(value.strip()),
                         message="--workdir is empty; name the run's directory, e.g. --workdir=runs/vqgan")

# Exit status of a run stopped by SIGTERM after saving (128 + 15), so schedulers see it as not finished.
PREEMPTED_EXIT_CODE = 143


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    writer.configure_console_logging()
    if _CPU_DEVICES.value is not None:
        try:
            parallel.split_cpu(_CPU_DEVICES.value)
        except ValueError as e:
            cli.fail(str(e))
    parallel.initialize_multihost(_MULTIHOST.value)
    host_memory.keep_freed_memory()
    try:
        training.train(_CONFIG.value, _WORKDIR.value)
    except loop.Preempted as e:
        print(e, file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_CODE)
    except (loop.NonFiniteError, checkpointing.UnrestorableCheckpointsError, locking.LockedError) as e:
        cli.fail(str(e))
    except ValueError as e:  # a config value the stage, data or loop refuses; the message names it
        cli.fail(str(e))
    except OSError as e:  # a full disk, an unwritable or missing path: nothing to debug in the code
        cli.fail(f"{e}; fix that, then run the same command again (it resumes from the last complete checkpoint)")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
