"""Precomputes VQGAN tokens and CLIP embeddings into a TFDS dataset for the prior.

  python tools/precompute.py --config=configs/precompute.py:shapes [--config.vqgan=runs/vqgan] [--config.x=v ...]

Running the same command again resumes an interrupted run (only missing shards are computed) and leaves a complete
dataset alone. On several hosts, run it on every host (each writes its own shards; process 0 writes the metadata).
"""

from absl import app, flags
from ml_collections import config_flags

import clipgen_jax  # noqa: F401  (registers the Shapes TFDS builder)
from clipgen_jax import cli, host_memory, locking, parallel, precompute
from clipgen_jax.data import precomputed
from clipgen_jax.training import writer

_CONFIG = config_flags.DEFINE_config_file("config", "configs/precompute.py:shapes",
                                          "Config file, e.g. configs/precompute.py:shapes.", lock_config=True)
_MULTIHOST = flags.DEFINE_bool("multihost", None, "Call jax.distributed.initialize() (default: detect from env).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    writer.configure_console_logging()
    parallel.initialize_multihost(_MULTIHOST.value)
    host_memory.keep_freed_memory()
    config = _CONFIG.value
    try:
        directory = precompute.precompute(config)
    except (precompute.PrecomputeError, locking.LockedError, FileNotFoundError) as error:  # says what to do
        cli.fail(str(error))
    except OSError as error:  # a full disk, an unwritable path
        cli.fail(f"{error}; fix that, then run the same command again (it computes only the missing shards)")
    if (directory / precomputed.INFO_FILE).is_file():
        metadata = precomputed.load_metadata(config.output.data_dir, config.output.name)
        print(f"{directory}: examples {metadata['num_examples']}, unreadable images skipped "
              f"{metadata['num_skipped']}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
