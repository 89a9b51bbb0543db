"""Converts a taming-transformers VQGAN into a VQGAN bundle that the later stages load:

    python tools/convert_taming.py --ckpt last.ckpt --config model.yaml --out runs/vqgan_taming

--ckpt is taming's Lightning checkpoint, --config its model YAML (`model.params.ddconfig`, `n_embed`, `embed_dim`),
--out a directory that must not exist yet. torch is optional: without it (or when `torch.load(weights_only=True)`
refuses the file) a restricted reader that runs no code from the file reads it.
"""

import pickle
import zipfile

from absl import app, flags

from clipgen_jax import cli
from clipgen_jax.models import taming_import

_CKPT = flags.DEFINE_string("ckpt", None, "taming's .ckpt file (a PyTorch Lightning checkpoint).")
_CONFIG = flags.DEFINE_string("config", None, "taming's model YAML for that checkpoint.")
_OUT = flags.DEFINE_string("out", None, "Output bundle directory (must not exist).")
_READER = flags.DEFINE_enum("reader", "auto", taming_import.READERS, taming_import.READER_HELP)
flags.mark_flags_as_required(["ckpt", "config", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        bundle = taming_import.convert(_CKPT.value, _CONFIG.value, _OUT.value, reader=_READER.value)
    except (OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        # OSError: missing input, existing output; ValueError: TamingImportError (bad YAML, mismatched keys);
        # UnpicklingError: UnsafePickleError or a damaged checkpoint.
        cli.fail(str(e))  # one line: torch's messages span several
    print(f"wrote {bundle}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
