"""OpenAI's CLIP tokenizer, offline: CLIPTokenizer files built from the BPE vocabulary shipped in this package.

The vocabulary (`assets/clip_bpe/bpe_simple_vocab_16e6.txt.gz`, MIT, see the LICENSE beside it) is the one OpenAI's
CLIP and open_clip use. The built `vocab.json` + `merges.txt` give transformers' CLIPTokenizer(Fast) exactly OpenAI's
49408 ids, so a CLIP trained here tokenizes like `openai/clip-vit-base-patch32`.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile

import importlib_resources
import transformers

VOCAB_SIZE = 49408
START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
_NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2  # byte tokens, byte tokens ending a word, and the two special tokens
_BPE_RESOURCE = ("clipgen_jax", "assets/clip_bpe/bpe_simple_vocab_16e6.txt.gz")
CACHE_ENV = "CLIPGEN_CACHE"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, which CLIP's BPE is written in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _read_merges() -> list[str]:
    data = importlib_resources.files(_BPE_RESOURCE[0]).joinpath(_BPE_RESOURCE[1]).read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    return lines[1:_NUM_MERGES + 1]  # line 0 is the "#version" header


def build_tokenizer_files(out_dir: str) -> str:
    """Writes vocab.json, merges.txt and the tokenizer configs that CLIPTokenizer(Fast).from_pretrained reads."""
    merges = _read_merges()
    byte_tokens = list(_bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m.split()) for m in merges]
    tokens += [START_OF_TEXT, END_OF_TEXT]
    if len(tokens) != VOCAB_SIZE:
        raise RuntimeError(f"built {len(tokens)} CLIP tokens, expected {VOCAB_SIZE}: the packaged vocabulary is "
                           "damaged; reinstall clipgen_jax")
    os.makedirs(out_dir, exist_ok=True)
    files = {
        "vocab.json": json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "special_tokens_map.json": json.dumps({"bos_token": START_OF_TEXT, "eos_token": END_OF_TEXT,
                                               "unk_token": END_OF_TEXT, "pad_token": END_OF_TEXT}),
        "tokenizer_config.json": json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
                                             "bos_token": START_OF_TEXT, "eos_token": END_OF_TEXT,
                                             "unk_token": END_OF_TEXT, "pad_token": END_OF_TEXT,
                                             "do_lower_case": True, "errors": "replace"}),
    }
    for name, text in files.items():
        # Written to a temporary name first, so a concurrent reader never sees half a vocabulary.
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out_dir, name))
    return out_dir


def cache_dir() -> str:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "clipgen_jax")
    return os.path.join(root, "clip_tokenizer")


def openai_tokenizer(model_max_length: int = 77) -> transformers.CLIPTokenizerFast:
    """OpenAI's CLIP tokenizer, built once into the cache directory from the packaged vocabulary."""
    directory = cache_dir()
    if not os.path.exists(os.path.join(directory, "tokenizer_config.json")):
        build_tokenizer_files(directory)
    return transformers.CLIPTokenizerFast.from_pretrained(directory, model_max_length=model_max_length)
