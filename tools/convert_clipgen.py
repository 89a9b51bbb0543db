"""Converts CLIP-GEN's released PyTorch models (github.com/HFAiLab/clip-gen) into a prior bundle and its VQGAN bundle:

    python tools/convert_clipgen.py --vqgan vqgan_coco.pt --gpt gpt_coco.pt --out runs/clipgen_coco
    python tools/generate.py --prior runs/clipgen_coco --text "A city bus driving on the city street" --out bus

--out (which must not exist yet) becomes the prior bundle, with the VQGAN bundle in --out/vqgan. The architecture is
read from the weights; the head count is not in them: --heads defaults to the released models' (16 for width 1024,
20 for 1280). --clip names the CLIP the prior is conditioned on: a Hub id is recorded unverified (loading warns), a
local directory is loaded and its weights' hash recorded. torch is optional: without it (or when
`torch.load(weights_only=True)` refuses a file) a restricted reader that runs no code from the file reads it.
"""

import pickle
import zipfile

from absl import app, flags

from clipgen_jax import cli
from clipgen_jax.models import clipgen_import, taming_import

_VQGAN = flags.DEFINE_string("vqgan", None, "The official VQGAN checkpoint (vqgan_coco.pt).")
_GPT = flags.DEFINE_string("gpt", None, "The official GPT checkpoint (gpt_coco.pt).")
_OUT = flags.DEFINE_string("out", None, "Output prior bundle directory (must not exist); the VQGAN goes to OUT/vqgan.")
_HEADS = flags.DEFINE_integer("heads", None, "The GPT's attention heads (default: 16 for width 1024, 20 for 1280; "
                              "required for other widths).")
_CLIP = flags.DEFINE_string("clip", clipgen_import.DEFAULT_CLIP,
                            "The CLIP the GPT is conditioned on: a Hub id (recorded unverified) or a local directory "
                            "(its weights' hash is recorded and checked whenever the prior loads).")
_READER = flags.DEFINE_enum("reader", "auto", taming_import.READERS, taming_import.READER_HELP)
flags.mark_flags_as_required(["vqgan", "gpt", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        bundle = clipgen_import.convert(_VQGAN.value, _GPT.value, _OUT.value, num_heads=_HEADS.value,
                                        clip=_CLIP.value, reader=_READER.value)
    except (OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        # OSError: missing input or CLIP, existing output; ValueError: ClipgenImportError (mismatched tensors, no
        # head count); UnpicklingError: UnsafePickleError or a damaged checkpoint.
        cli.fail(str(e))  # one line: torch's messages span several
    print(f"wrote the prior bundle {bundle} and its VQGAN bundle {bundle / clipgen_import.VQGAN_DIR}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
