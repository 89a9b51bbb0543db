"""Text (or an image's CLIP embedding) -> prior sampling -> VQGAN decoding -> CLIP re-ranking, in one object.

    from clipgen_jax.pipeline import Pipeline
    pipe = Pipeline.load("runs/shapes/prior")   # a prior training workdir or an exported bundle
    images_PKHWC, scores_PK = pipe.generate(["a small red circle in the top left on a black background"],
                                            num_candidates=16, keep=1)

`tools/generate.py`, the prior's training evaluation and notebooks all go through `Pipeline`. The VQGAN and the CLIP
default to the ones the prior was trained with (its metadata names them); any VQGAN or CLIP, default or not, is
checked against the weights the prior's training data was made with, because a prior only means something with the
tokenizer and the embedding space it learned.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import shlex
import shutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image

from clipgen_jax import checkpointing, numerics, packaged, sampling
from clipgen_jax.data import precomputed
from clipgen_jax.models import clip as clip_lib
from clipgen_jax.models import prior as prior_lib
from clipgen_jax.models import vqgan as vqgan_lib
from clipgen_jax.training import writer

logger = logging.getLogger(__name__)

KIND = "prior"
CHECKPOINTS_DIR = "checkpoints"
CONFIG_FILE = "config.json"  # the resolved training config the loop writes into a workdir
SAMPLES_FILE = "samples.json"
GRID_FILE = "grid.png"


class PromptError(ValueError):
    """A prompt that cannot be used (empty, or longer than the CLIP's context)."""


class ModelMismatchError(ValueError):
    """A VQGAN or CLIP other than the ones the prior was trained with."""


# ----------------------------------------------------------------------------------------------------------------
# What a prior bundle records, and finding its VQGAN and CLIP again.


def model_reference(name_or_path: str) -> str:
    """How metadata names a model: a packaged name or a Hub id as given; an existing local path made absolute."""
    name = str(name_or_path)
    if name not in clip_lib.PACKAGED and os.path.exists(name):
        return str(pathlib.Path(name).absolute())
    return name


def prior_metadata(config: Mapping[str, Any], *, vqgan_path: str | pathlib.Path, step: int,
                   identities: Mapping[str, Any] | None, bundle_dir: str | pathlib.Path | None = None) -> dict:
    """The metadata of a prior bundle: model config, conditioning, the VQGAN bundle and CLIP it works with (and the
    identities of both from the training data, which loading checks), from a training config (as a dict).

    With `bundle_dir`, the VQGAN's (and a local CLIP's) path relative to it is kept too, so a runs directory moved as
    a whole still loads."""
    vqgan_path = pathlib.Path(vqgan_path).absolute()
    clip_reference = model_reference(config["clip"])
    metadata = {
        "kind": KIND,
        "model": {k: config["model"][k] for k in prior_lib.CONFIG_FIELDS if k in config["model"]},
        "cond": dict(config["cond"]),
        "vqgan": str(vqgan_path),
        "clip": clip_reference,
        "step": int(step),
        "identities": None if identities is None else {k: dict(identities[k]) for k in ("vqgan", "clip")},
        "data": dict(config["data"]),
        "seed": config.get("seed"),
    }
    if bundle_dir is not None:
        bundle_dir = pathlib.Path(bundle_dir).absolute()
        metadata["vqgan_relative"] = os.path.relpath(vqgan_path, bundle_dir)
        if os.path.isabs(clip_reference):
            metadata["clip_relative"] = os.path.relpath(clip_reference, bundle_dir)
    return metadata


def _locate(metadata: Mapping[str, Any], key: str, bundle_dir: pathlib.Path | None) -> str:
    """The recorded path when it exists, else the recorded relative path from the bundle when that exists, else the
    recorded value (a Hub id or packaged name, or a path that the loader reports as missing)."""
    recorded = metadata[key]
    relative = metadata.get(f"{key}_relative")
    if not os.path.exists(recorded) and relative is not None and bundle_dir is not None:
        candidate = bundle_dir / relative
        if candidate.exists():
            return str(candidate)
    return recorded


def _checkpoint_steps(workdir: pathlib.Path) -> list[int]:
    directory = workdir / CHECKPOINTS_DIR
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def _restore_checkpoint_params(workdir: pathlib.Path, step: int, model: prior_lib.Prior) -> Any:
    """Only the params of a training checkpoint: AdamW's two moments, two thirds of its bytes, stay unread. The
    checkpoint's files are checked against its manifest first, as a resuming run checks them."""
    directory = workdir / CHECKPOINTS_DIR / str(step)
    checkpointing.verify_or_warn(directory, "checkpoint")
    abstract = {"params": jax.eval_shape(lambda: prior_lib.init_params(model, jax.random.PRNGKey(0)))}
    restored = ocp.PyTreeCheckpointer().restore(
        (directory / checkpointing.STATE_ITEM).absolute(),
        args=ocp.args.PyTreeRestore(item=abstract, partial_restore=True,
                                    restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)))
    return jax.tree.map(jnp.asarray, restored["params"])


def _load_prior_bundle(bundle: pathlib.Path, dtype: Any) -> tuple[prior_lib.Prior, Any, dict, pathlib.Path]:
    bundle = checkpointing.bundle_path(bundle, KIND)  # checks the kind
    metadata = checkpointing.load_bundle_metadata(bundle)
    model = prior_lib.from_config(metadata["model"], dtype)
    abstract = jax.eval_shape(lambda: prior_lib.init_params(model, jax.random.PRNGKey(0)))
    return model, checkpointing.load_bundle_params(bundle, abstract), metadata, bundle.absolute()


def _load_prior_checkpoint(workdir: pathlib.Path, step: int, dtype: Any) -> tuple[prior_lib.Prior, Any, dict, None]:
    config_path = workdir / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{workdir} has checkpoints but no {CONFIG_FILE} (the training config); it is not a "
                                "prior training workdir")
    config = json.loads(config_path.read_text())
    if config.get("stage") != KIND:
        raise ValueError(f"{workdir} is a {config.get('stage')!r} training workdir, not a prior one")
    try:
        identities = precomputed.load_metadata(config["data"]["data_dir"], config["data"]["name"])
    except (FileNotFoundError, ValueError):
        identities = None  # the training data is gone: the VQGAN and CLIP cannot be checked against it
    metadata = prior_metadata(config, vqgan_path=config["vqgan"], step=step, identities=identities)
    model = prior_lib.from_config(metadata["model"], dtype)
    logger.info("loading the prior from checkpoint %d of %s", step, workdir)
    return model, _restore_checkpoint_params(workdir, step, model), metadata, None


def load_prior(path: str | pathlib.Path, dtype: Any = jnp.float32
               ) -> tuple[prior_lib.Prior, Any, dict, pathlib.Path | None]:
    """(model, params, metadata, bundle directory or None) of a prior bundle, or of a training workdir: its export, or
    its latest checkpoint when that is newer (a run still training, or resumed past its export); or a packaged name
    (`packaged.PRIORS`: "shapes").

    Files that differ from their manifest raise `checkpointing.CorruptCheckpointError`; in a workdir, as when training
    resumes, a damaged export or checkpoint is skipped with a warning naming the file, for the newest intact one (left
    where it is: a reader does not move a run's files)."""
    if str(path) in packaged.PRIORS and not pathlib.Path(path).exists():  # a local directory of that name wins
        path = packaged.path(packaged.PRIORS[str(path)])
        if not checkpointing.is_bundle(path):
            raise FileNotFoundError(f"the packaged prior is missing from {path}; reinstall clipgen_jax")
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"no prior at {path}: train one (python tools/demo.py, or python tools/train.py "
            f"--config=configs/prior.py:shapes --workdir={path}) or pass --prior DIR")
    if checkpointing.is_bundle(path):
        return _load_prior_bundle(path, dtype)
    export = path / checkpointing.EXPORT_DIR
    # (step, bundle or None for a checkpoint), newest first; at the same step the export, which needs no config.
    candidates = [(step, None) for step in _checkpoint_steps(path)]
    if checkpointing.is_bundle(export):
        candidates.append((checkpointing.load_bundle_metadata(export).get("step", -1), export))
    candidates.sort(key=lambda candidate: (candidate[0], candidate[1] is not None), reverse=True)
    if not candidates:
        raise FileNotFoundError(f"{path} holds neither a prior bundle nor a training checkpoint: pass a prior "
                                "training workdir or its export/")
    damaged = []
    for step, bundle in candidates:
        try:
            return _load_prior_bundle(bundle, dtype) if bundle else _load_prior_checkpoint(path, step, dtype)
        except checkpointing.CorruptCheckpointError as error:
            logger.warning("%s; trying an older prior in %s", error, path)
            damaged.append(str(error))
    raise checkpointing.CorruptCheckpointError(
        f"every prior in {path} is damaged ({'; '.join(damaged)}): train it again, or restore the files from a copy")


def _short(weights_hash: str) -> str:
    return weights_hash[:12]


def check_models(metadata: Mapping[str, Any], prior_path: str | pathlib.Path, vqgan_identity: Mapping[str, Any],
                 clip_identity: Mapping[str, Any]) -> None:
    """Raises ModelMismatchError (one line) unless the VQGAN and CLIP are those of the prior's training data."""
    identities = metadata.get("identities")
    if not identities:
        logger.warning("the prior %s records no VQGAN/CLIP identities; not checking them", prior_path)
        return
    for what, flag, given in (("VQGAN", "vqgan", vqgan_identity), ("CLIP", "clip", clip_identity)):
        stored = identities[flag]
        if stored["weights_hash"] is None:  # a converted prior whose CLIP was named by Hub id, not loaded
            logger.warning("the prior %s records the %s %s unverified (no weights hash): not checking that %s is "
                           "the one it was trained with", prior_path, what, stored.get("name"), given.get("name"))
            continue
        if stored["weights_hash"] != given["weights_hash"]:
            given_name = given.get("path", given.get("name"))
            stored_name = stored.get("path", stored.get("name"))
            raise ModelMismatchError(
                f"the prior {prior_path} was trained with the {what} {stored_name} (weights "
                f"{_short(stored['weights_hash'])}), but the {what} {given_name} has weights "
                f"{_short(given['weights_hash'])}: pass --{flag} with the {what} the prior was trained with, or "
                f"train a prior on data precomputed with this {what}")


# ----------------------------------------------------------------------------------------------------------------
# The pipeline.


def _to_uint8(images: jax.Array) -> jax.Array:
    """[-1, 1] floats -> uint8 pixels, rounded as image_metrics.to_uint8 (and a saved PNG) does."""
    return jnp.round((jnp.clip(images.astype(jnp.float32), -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8)


def decode_and_score(vqgan: vqgan_lib.VQGAN, vqgan_params: Any, clip: clip_lib.CLIP, clip_params: Any,
                     tokens_Bhw: jax.Array, query_BD: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Code grids -> uint8 images and their CLIP cosine similarity to the query embeddings. CLIP sees the uint8
    images, exactly what a saved PNG holds, through its own preprocessing. Every generation method scores this way,
    so that their scores compare."""
    images_u8 = _to_uint8(vqgan.apply({"params": vqgan_params}, tokens_Bhw, method=vqgan.decode))
    features_BD = clip.image_features(clip_params, images_u8.astype(jnp.float32) / 127.5 - 1.0)
    return images_u8, jnp.sum(features_BD * query_BD, axis=-1)


def image_pixels(image: Image.Image) -> np.ndarray:
    """An image -> RGB float32 [H, W, 3] in [-1, 1], as `CLIP.embed_images` takes it (and resizes and crops it)."""
    return np.asarray(image.convert("RGB"), np.float32) / 127.5 - 1.0


def check_prompts(clip: clip_lib.CLIP, texts: Sequence[str]) -> list[str]:
    """The prompts as a list; PromptError for an empty one or one longer than the CLIP's context."""
    if isinstance(texts, str):
        raise PromptError("texts must be a list of prompts, not one string")
    texts = list(texts)
    if not texts:
        raise PromptError("no prompts given")
    lengths = [len(ids) for ids in clip.tokenizer(
        [t if isinstance(t, str) else "" for t in texts], truncation=False).input_ids]
    for index, (text, length) in enumerate(zip(texts, lengths)):
        if not isinstance(text, str) or not text.strip():
            raise PromptError(f"prompt {index} is empty")
        if length > clip.context_length:
            raise PromptError(f"prompt {index} is too long: {length} CLIP tokens, at most "
                              f"{clip.context_length} fit ({text[:60]!r}...)")
    return texts


def query_embeddings(clip: clip_lib.CLIP, texts: Sequence[str] | None, image_embeddings: np.ndarray | None
                     ) -> np.ndarray:
    """The L2-normalised CLIP embeddings [P, D] that condition and rank: of the prompts, or the given image
    embeddings (variations); exactly one of the two."""
    if (texts is None) == (image_embeddings is None):
        raise ValueError("pass exactly one of texts and image_embeddings")
    if texts is not None:
        return clip.embed_texts(check_prompts(clip, texts))
    queries_PD = np.asarray(numerics.l2_normalise(jnp.asarray(image_embeddings, jnp.float32)))
    if queries_PD.ndim != 2 or queries_PD.shape[1] != clip.embed_dim or not len(queries_PD):
        raise ValueError(f"image_embeddings must be [P, {clip.embed_dim}], got {queries_PD.shape}")
    return queries_PD


def rerank(images_PNHWC: np.ndarray, scores_PN: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """The `keep` best-scoring candidates of each prompt, best first (ties keep candidate order)."""
    order_PK = np.argsort(-scores_PN, axis=1, kind="stable")[:, :keep]
    return (np.take_along_axis(images_PNHWC, order_PK[:, :, None, None, None], axis=1),
            np.take_along_axis(scores_PN, order_PK, axis=1))


@dataclasses.dataclass
class Pipeline:
    """A prior with the VQGAN that decodes its tokens and the CLIP that conditions it and re-ranks its images."""

    prior: prior_lib.Prior
    prior_params: Any
    vqgan: vqgan_lib.VQGAN
    vqgan_params: Any
    clip: clip_lib.CLIP
    metadata: dict
    # The models as `load` was given them ({"prior": ..., and "vqgan", "clip" when not the prior's own}): the flags of
    # the tools/generate.py command that reproduces an image (`command_line`).
    source: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        side = self.vqgan.resolution // self.vqgan.downsample_factor
        if side * side != self.prior.num_tokens or self.vqgan.codebook_size != self.prior.vocab_size:
            raise ModelMismatchError(
                f"the prior models {self.prior.num_tokens} tokens of {self.prior.vocab_size} codes, but the VQGAN "
                f"makes {side} x {side} tokens of {self.vqgan.codebook_size} codes")
        if self.clip.embed_dim != self.prior.cond_dim:
            raise ModelMismatchError(f"the prior is conditioned on {self.prior.cond_dim}-d embeddings, but the CLIP "
                                     f"{self.clip.name} makes {self.clip.embed_dim}-d ones")
        self.grid_shape = (side, side)
        self._decode_and_score = jax.jit(self._decode_and_score_fn)

    @classmethod
    def load(cls, prior_path: str | pathlib.Path, vqgan: str | pathlib.Path | None = None,
             clip: str | None = None, *, dtype: Any = jnp.float32) -> Pipeline:
        """From a prior training workdir (its export, or its latest checkpoint when newer) or a prior bundle; the
        VQGAN (workdir or bundle) and the CLIP (Hub id, directory, packaged name) default to the prior's own."""
        model, params, metadata, bundle_dir = load_prior(prior_path, dtype)
        vqgan_path = checkpointing.bundle_path(vqgan or _locate(metadata, "vqgan", bundle_dir), "vqgan")
        vqgan_model, vqgan_params, vqgan_metadata = checkpointing.load_vqgan(vqgan_path, dtype)
        loaded_clip = clip_lib.load(clip or _locate(metadata, "clip", bundle_dir), dtype=dtype)
        check_models(metadata, prior_path,
                     precomputed.vqgan_identity(vqgan_path, vqgan_params, vqgan_metadata["model"]),
                     precomputed.clip_identity(loaded_clip))
        source = {flag: str(value) for flag, value in (("prior", prior_path), ("vqgan", vqgan), ("clip", clip))
                  if value is not None}
        return cls(prior=model, prior_params=params, vqgan=vqgan_model, vqgan_params=vqgan_params, clip=loaded_clip,
                   metadata=metadata, source=source)

    @property
    def image_size(self) -> int:
        return self.vqgan.resolution

    # -- inputs ------------------------------------------------------------------------------------------------------

    def check_prompts(self, texts: Sequence[str]) -> list[str]:
        """The prompts as a list; PromptError for an empty one or one longer than the CLIP's context."""
        return check_prompts(self.clip, texts)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.clip.embed_texts(self.check_prompts(texts))

    # -- generation --------------------------------------------------------------------------------------------------

    def _decode_and_score_fn(self, vqgan_params, clip_params, tokens_BL, query_BD):
        return decode_and_score(self.vqgan, vqgan_params, self.clip, clip_params,
                                tokens_BL.reshape((-1,) + self.grid_shape), query_BD)

    @property
    def null_embedding_trained(self) -> bool:
        """Whether the prior was trained with condition dropout (cond.dropout > 0), which classifier-free guidance
        needs: otherwise its null embedding is still its random initialisation."""
        return bool(self.metadata.get("cond", {}).get("dropout"))

    def generate(self, texts: Sequence[str] | None = None, image_embeddings: np.ndarray | None = None, *,
                 num_candidates: int = 16, keep: int = 1, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, guidance_scale: float = 1.0, seed: int = 0, batch_size: int = 64,
                 prompt_indices: Sequence[int] | None = None, first_candidates: Sequence[int] | None = None,
                 progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """For each prompt (or CLIP image embedding: variations of that image), draws `num_candidates` images,
        ranks them by CLIP similarity to the prompt (or embedding) and keeps the best `keep`.

        Returns (uint8 images [P, keep, H, W, 3], scores [P, keep] sorted descending). Candidate n of prompt p is
        drawn with the key `sampling.row_keys(seed, prompt_indices[p], first_candidates[p] + n)` (by default the
        prompt's position p in `texts` and n), so it is the same whatever batch_size, num_candidates or the other
        prompts, up to floating point (see `sampling`: another number of rows per call can flip a near tie).
        The sampler draws at most `batch_size` rows per call, padded to a power of two so that few shapes compile;
        `progress(rows done, rows)` is called after each call."""
        return self.generate_from_embeddings(
            query_embeddings(self.clip, texts, image_embeddings), num_candidates=num_candidates, keep=keep,
            temperature=temperature, top_k=top_k, top_p=top_p, guidance_scale=guidance_scale, seed=seed,
            batch_size=batch_size, prompt_indices=prompt_indices, first_candidates=first_candidates,
            progress=progress)

    def generate_from_embeddings(self, queries_PD: np.ndarray, *, num_candidates: int = 16, keep: int = 1,
                                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                                 guidance_scale: float = 1.0, seed: int = 0, batch_size: int = 64,
                                 prompt_indices: Sequence[int] | None = None,
                                 first_candidates: Sequence[int] | None = None,
                                 progress: Callable[[int, int], None] | None = None
                                 ) -> tuple[np.ndarray, np.ndarray]:
        """`generate` for L2-normalised CLIP embeddings [P, D] (text or image) that condition and rank at once."""
        check_candidates(num_candidates, keep, batch_size)
        check_sampling_settings(temperature, top_k, top_p, guidance_scale, self.prior.vocab_size)
        check_guidance(guidance_scale, self.metadata.get("cond", {}))
        queries_PD = np.asarray(queries_PD, np.float32)
        num_prompts = len(queries_PD)
        prompt_index_P = np.arange(num_prompts) if prompt_indices is None else np.asarray(prompt_indices)
        first_candidate_P = np.zeros(num_prompts, int) if first_candidates is None else np.asarray(first_candidates)
        if prompt_index_P.shape != (num_prompts,) or first_candidate_P.shape != (num_prompts,):
            raise ValueError(f"prompt_indices and first_candidates need one entry per prompt ({num_prompts})")
        # Row p * N + n: candidate n of prompt p.
        rows_RD = np.repeat(queries_PD, num_candidates, axis=0)
        keys_R2 = sampling.row_keys(seed, np.repeat(prompt_index_P, num_candidates),
                                    (first_candidate_P[:, None] + np.arange(num_candidates)).reshape(-1))
        num_rows = len(rows_RD)
        rows_per_call = min(batch_size, 1 << (num_rows - 1).bit_length())
        images, scores = [], []
        for start in range(0, num_rows, rows_per_call):
            chunk_BD, chunk_keys_B2 = rows_RD[start:start + rows_per_call], keys_R2[start:start + rows_per_call]
            valid = len(chunk_BD)
            # One shape for every call (the last is padded with copies), so the sampler compiles once.
            chunk_BD = np.concatenate([chunk_BD, np.repeat(chunk_BD[-1:], rows_per_call - valid, axis=0)])
            chunk_keys_B2 = jnp.concatenate([chunk_keys_B2,
                                             jnp.repeat(chunk_keys_B2[-1:], rows_per_call - valid, axis=0)])
            tokens_BL = sampling.sample(self.prior, self.prior_params, jnp.asarray(chunk_BD), chunk_keys_B2,
                                        temperature=temperature, top_k=top_k, top_p=top_p,
                                        guidance_scale=guidance_scale)
            images_u8, scores_B = self._decode_and_score(self.vqgan_params, self.clip.params, tokens_BL,
                                                         jnp.asarray(chunk_BD))
            images.append(np.asarray(images_u8)[:valid])
            scores.append(np.asarray(scores_B, np.float32)[:valid])
            if progress is not None:
                progress(start + valid, num_rows)
        images_PNHWC = np.concatenate(images).reshape((num_prompts, num_candidates) + images[0].shape[1:])
        scores_PN = np.concatenate(scores).reshape(num_prompts, num_candidates)
        return rerank(images_PNHWC, scores_PN, keep)

    # -- one request, as an interactive front end makes it ---------------------------------------------------------

    def generate_one(self, text: str | None = None, image_embedding: np.ndarray | None = None, *,
                     image_path: str = "IMAGE", num_candidates: int = 16, keep: int = 1, temperature: float = 1.0,
                     top_k: int | None = None, top_p: float | None = None, guidance_scale: float = 1.0,
                     seed: int = 0, batch_size: int = 64, progress: Callable[[int, int], None] | None = None
                     ) -> Generation:
        """`generate` for one prompt (or one CLIP image embedding [D], of the image at `image_path`), with the
        tools/generate.py command that draws the same images: prompt index 0, candidates 0 ... N - 1, and the same
        rows per call (the tokens do not depend on them, but the decoder may round a pixel differently)."""
        settings = dict(num_candidates=num_candidates, keep=keep, temperature=temperature, top_k=top_k, top_p=top_p,
                        guidance_scale=guidance_scale, seed=seed, batch_size=batch_size)
        images_PKHWC, scores_PK = self.generate(
            None if text is None else [text], None if image_embedding is None else np.asarray(image_embedding)[None],
            progress=progress, **settings)
        return Generation(images_KHWC=images_PKHWC[0], scores_K=scores_PK[0],
                          command=self.command_line(text=text, image_path=None if text is not None else image_path,
                                                    **settings))

    def command_line(self, *, text: str | None = None, image_path: str | None = None, **settings: Any) -> str:
        """The shell command `python tools/generate.py ...` that generates with these models, the prompt (or image)
        and the `generate` settings given (every one named explicitly, so that it does not depend on defaults)."""
        if (text is None) == (image_path is None):
            raise ValueError("pass exactly one of text and image_path")
        words = ["python", "tools/generate.py", *(f"--{flag}={value}" for flag, value in self.source.items()),
                 f"--text={text}" if text is not None else f"--image={image_path}"]
        words += [f"--{name}={value}" for name, value in settings.items() if value is not None]
        return shlex.join(words)


@dataclasses.dataclass(frozen=True)
class Generation:
    """What `Pipeline.generate_one` returns: the kept images best first, their CLIP scores, and the command."""

    images_KHWC: np.ndarray  # uint8
    scores_K: np.ndarray  # CLIP cosine similarity to the prompt (or image), descending
    command: str  # python tools/generate.py ... that writes the same images


# The sampling settings of the paper's released code (HFAiLab/clip-gen demo.py): `tools/generate.py --preset`.
SAMPLING_PRESETS = {"official": dict(temperature=1.0, top_k=500, top_p=0.95, num_candidates=64, keep=8)}


def check_candidates(num_candidates: int, keep: int, batch_size: int) -> None:
    """The settings every generation method shares: candidates per prompt, how many are kept, rows per call."""
    if num_candidates < 1:
        raise ValueError(f"num_candidates={num_candidates} must be at least 1")
    if not 1 <= keep <= num_candidates:
        raise ValueError(f"keep={keep} must be between 1 and num_candidates={num_candidates}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")


def check_sampling_settings(temperature: float, top_k: int | None, top_p: float | None, guidance_scale: float,
                            vocab_size: int | None = None) -> None:
    """The prior's sampling settings; `vocab_size` (the prior's) bounds top_k. tools/generate.py checks them without
    it before any model loads, so that a typo costs no loading time."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature={temperature} must be a number >= 0 (0 takes the most likely token)")
    if top_k is not None and not (top_k >= 1 and (vocab_size is None or top_k <= vocab_size)):
        raise ValueError(f"top_k={top_k} must be at least 1" if vocab_size is None else
                         f"top_k={top_k} must be between 1 and the vocabulary size {vocab_size}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if not (math.isfinite(guidance_scale) and guidance_scale >= 0):
        raise ValueError(f"guidance_scale={guidance_scale} must be a number >= 0 (1 is no guidance, 0 ignores the "
                         "prompt)")


def check_guidance(guidance_scale: float, cond: Mapping[str, Any]) -> None:
    """ValueError (one line) for guidance_scale != 1 with a prior trained without condition dropout (`cond`, its
    config's): its null embedding, which guidance samples against, is then untrained."""
    if guidance_scale != 1.0 and not cond.get("dropout"):
        raise ValueError(f"guidance_scale={guidance_scale} needs a prior trained with condition dropout (cond.dropout "
                         "> 0), which this one was not: its null embedding is untrained; use guidance_scale 1")


# ----------------------------------------------------------------------------------------------------------------
# Prompts files and the output layout of docs/SHAPES.md "Generated images".


def read_prompts_file(path: str | pathlib.Path) -> list[str]:
    """One prompt per line (UTF-8); a final newline is fine, an empty line anywhere else is a PromptError."""
    try:
        text = pathlib.Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise PromptError(f"cannot read the prompts file {path}: {reason}") from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    lines = [line.removesuffix("\r") for line in lines]
    if not lines:
        raise PromptError(f"the prompts file {path} is empty; write one prompt per line")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise PromptError(f"line {number} of the prompts file {path} is empty; write one prompt per line, with "
                              "no empty lines")
    return lines


def sample_file_name(prompt_index: int, rank: int) -> str:
    return f"{prompt_index:04d}_{rank:02d}.png"


def save_samples(out: str | pathlib.Path, images_PKHWC: np.ndarray, scores_PK: np.ndarray, *, seed: int,
                 prompts: Sequence[str] | None = None, sources: Sequence[str] | None = None) -> pathlib.Path:
    """Writes OUT/{prompt_index:04d}_{rank:02d}.png (rank 0 = best), OUT/grid.png (a row per prompt, or a square grid
    when one image is kept) and OUT/samples.json (one record per image: prompt or source image, seed, file, CLIP score).

    Everything is written to a hidden sibling first and renamed into place, so OUT is complete or absent; an existing
    OUT is replaced only when it is empty or an earlier output of this function (it holds samples.json)."""
    out = pathlib.Path(out).absolute()
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / SAMPLES_FILE).is_file())):
        raise FileExistsError(f"{out} exists and is not an earlier output of generate (no {SAMPLES_FILE}); choose "
                              "another --out")
    num_prompts, keep = images_PKHWC.shape[:2]
    temporary = out.with_name(f".{out.name}.incomplete")
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir(parents=True)
    try:
        records = []
        for p in range(num_prompts):
            for rank in range(keep):
                name = sample_file_name(p, rank)
                Image.fromarray(images_PKHWC[p, rank]).save(temporary / name)
                record = {"prompt_index": p, "rank": rank}
                if prompts is not None:
                    record["prompt"] = prompts[p]
                if sources is not None:
                    record["image"] = str(sources[p])
                record.update(seed=int(seed), file=name, clip_score=float(scores_PK[p, rank]))
                records.append(record)
        columns = keep if keep > 1 else math.ceil(math.sqrt(num_prompts))
        grid = writer.image_grid(images_PKHWC.reshape((-1,) + images_PKHWC.shape[2:]), columns=columns)
        Image.fromarray(grid).save(temporary / GRID_FILE)
        (temporary / SAMPLES_FILE).write_text(json.dumps(records, indent=2) + "\n")
        if out.exists():
            replaced = out.with_name(f".{out.name}.replaced")
            if replaced.exists():
                shutil.rmtree(replaced)
            out.rename(replaced)
            temporary.rename(out)
            shutil.rmtree(replaced)
        else:
            temporary.rename(out)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary)
    return out
