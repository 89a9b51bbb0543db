"""Stage 2: the CLIP-conditioned prior, p(image tokens | CLIP embedding), on a precomputed dataset.

Loss: next-token cross entropy over all image tokens given the embedding's prefix, plus optionally the paper's
embedding-reconstruction term: the logits' straight-through argmax (one-hot forward, softmax gradient) picks codebook
vectors, the frozen VQGAN decodes them, the frozen CLIP embeds the image, and 1 - cos to the input embedding is
added with weight `cond.reconstruction_weight`. Conditioning switches (`condition`): image or text embeddings, LAFITE
noise, condition dropout to a learned null embedding (classifier-free guidance). AdamW with weight decay on matrices
only, warmup + cosine, gradient clipping, and gradient accumulation over micro-batches inside one jitted step.

The run refuses a dataset precomputed with another VQGAN or CLIP than the config names, evaluates by sampling (on
Shapes: the held-out canonical prompts, scored by the oracle) and ends by exporting an inference bundle
`workdir/export` that `clipgen_jax.pipeline.Pipeline.load` and `tools/generate.py` read.
"""

from __future__ import annotations

import functools
import logging
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import optax
from PIL import Image

from clipgen_jax import checkpointing, numerics, optimizer, parallel, pipeline
from clipgen_jax.data import precomputed, shapes
from clipgen_jax.models import clip as clip_lib
from clipgen_jax.models import prior as prior_lib
from clipgen_jax.training import loop, writer

logger = logging.getLogger(__name__)

# cond.source -> the dataset feature the prior is conditioned on.
COND_SOURCES = {"image": precomputed.IMAGE_EMBEDDING, "text": precomputed.TEXT_EMBEDDING}


def condition(embedding_BD: jax.Array, rng: jax.Array, *, noise: float, dropout: float
              ) -> tuple[jax.Array, jax.Array]:
    """Training-time conditioning -> (cond [B, D] float32, use_null [B] bool).

    The embedding is L2-normalised; with `noise` xi > 0 it becomes normalise(e + xi * normalise(gaussian)) (LAFITE:
    a unit-norm perturbation of relative size xi, which bridges the image/text modality gap); with `dropout` p > 0 each
    row uses the prior's learned null embedding with probability p (what classifier-free guidance samples against).
    """
    noise_rng, dropout_rng = jax.random.split(rng)
    cond_BD = numerics.l2_normalise(embedding_BD.astype(jnp.float32))
    if noise > 0:
        gaussian_BD = jax.random.normal(noise_rng, cond_BD.shape, jnp.float32)
        cond_BD = numerics.l2_normalise(cond_BD + noise * numerics.l2_normalise(gaussian_BD))
    if dropout > 0:
        use_null_B = jax.random.bernoulli(dropout_rng, dropout, cond_BD.shape[:1])
    else:
        use_null_B = jnp.zeros(cond_BD.shape[:1], jnp.bool_)
    return cond_BD, use_null_B


def decay_mask(params):
    """Weight decay on matrices only: Dense/attention kernels, never biases, norms, embeddings or the null embedding.
    Decided by the leaf's name, not its rank, because scanned layers stack biases into matrices."""
    return jax.tree_util.tree_map_with_path(lambda path, _: str(getattr(path[-1], "key", path[-1])) == "kernel",
                                            params)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Refuses settings that cannot run, before anything is loaded."""
    cond = config.cond
    if cond.source not in COND_SOURCES:
        raise ValueError(f"cond.source={cond.source!r} is not one of {sorted(COND_SOURCES)}")
    if cond.noise < 0:
        raise ValueError(f"cond.noise={cond.noise} must be >= 0")
    if not 0 <= cond.dropout < 1:
        raise ValueError(f"cond.dropout={cond.dropout} must be in [0, 1)")
    if cond.reconstruction_weight < 0:
        raise ValueError(f"cond.reconstruction_weight={cond.reconstruction_weight} must be >= 0")
    accumulation = config.optimizer.accumulation_steps
    if accumulation < 1 or config.train.batch_size % accumulation:
        raise ValueError(f"optimizer.accumulation_steps={accumulation} must be a positive divisor of "
                         f"train.batch_size={config.train.batch_size}")
    e = config.eval  # used at the first evaluation, after training has begun: a bad one would stop it there
    try:
        pipeline.check_sampling_settings(e.temperature, e.top_k, e.top_p, e.guidance_scale, config.model.vocab_size)
        pipeline.check_guidance(e.guidance_scale, cond)
    except ValueError as error:
        raise ValueError(f"eval.{error}") from None


def check_frozen_models_named(config: ml_collections.ConfigDict) -> None:
    for name in ("vqgan", "clip"):
        if not config[name]:
            raise ValueError(f"config.{name} is required: the {name.upper()} the precomputed dataset was made with")


def check_model_fits(model_config: ml_collections.ConfigDict, dataset_metadata: dict, dataset: str) -> None:
    """The model's vocabulary, sequence length and condition width must be the dataset's."""
    grid_h, grid_w = dataset_metadata["grid_shape"]
    expected = {"vocab_size": dataset_metadata["codebook_size"], "num_tokens": grid_h * grid_w,
                "cond_dim": dataset_metadata["clip"]["embed_dim"]}
    for field, value in expected.items():
        if model_config[field] != value:
            raise ValueError(f"model.{field}={model_config[field]} but {dataset} has {value} (codebook "
                             f"{dataset_metadata['codebook_size']}, grid {grid_h}x{grid_w}, CLIP embeddings "
                             f"{expected['cond_dim']}-d): set --config.model.{field}={value}")


# What fine-tuning (`init_from`) keeps of the run's own model config; every other field is the loaded prior's.
RUN_MODEL_FIELDS = ("dropout_rate", "scan_layers", "remat")


def load_init_from(config: ml_collections.ConfigDict) -> tuple[dict, dict]:
    """(params, metadata) of the prior `config.init_from` names (a bundle, e.g. tools/convert_clipgen.py's, or a
    training workdir), after setting config.model's architecture to that prior's (all fields but RUN_MODEL_FIELDS).
    The params come laid out for config.model (scanned or unrolled layers)."""
    model, params, metadata, _ = pipeline.load_prior(config.init_from)
    with config.unlocked():
        for field in prior_lib.CONFIG_FIELDS:
            value = getattr(model, field)
            if field not in RUN_MODEL_FIELDS and config.model.get(field) != value:
                logger.info("model.%s = %r (was %r): the architecture of init_from %s", field, value,
                            config.model.get(field), config.init_from)
                config.model[field] = value
    if model.scan_layers != config.model.scan_layers:
        relayout = prior_lib.stack_block_params if config.model.scan_layers else prior_lib.unstack_block_params
        params = relayout(params, model.depth)
    return params, metadata


def check_params_fit(params, abstract_params, source: str) -> None:
    """One line naming the first parameter whose presence or shape differs between `params` and the model's."""
    def shapes(tree):
        return {jax.tree_util.keystr(path): leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}

    given, expected = shapes(params), shapes(abstract_params)
    for name in sorted(given.keys() | expected.keys()):
        if given.get(name) != expected.get(name):
            raise ValueError(f"{source} does not fit the model: parameter {name} is {given.get(name, 'absent')} "
                             f"there and {expected.get(name, 'absent')} in the model; start from a prior of this "
                             "architecture")


class PriorSteps:
    """The prior's pure training functions (fresh state, loss, accumulated gradients, step) from its config alone.

    Nothing is read from disk but `init_from`'s prior, so a preset's step can be compiled ahead of time on abstract
    inputs for any mesh (tests/training/test_fsdp_compile.py does so for gpt2_large). The reconstruction loss needs
    the frozen VQGAN and CLIP: PriorStage, the stage that trains, adds them, the dataset and evaluation."""

    def __init__(self, config: ml_collections.ConfigDict):
        check_config(config)
        self.config = config
        # Fine-tuning: the loaded prior's architecture and (initial_params) weights.
        self.init_from_params, self.init_from_metadata = (
            load_init_from(config) if config.get("init_from") else (None, None))
        self.model = prior_lib.from_config(config.model, parallel.compute_dtype(config.train.compute_dtype))
        if self.init_from_params is not None:
            check_params_fit(self.init_from_params,
                             jax.eval_shape(lambda: prior_lib.init_params(self.model, jax.random.PRNGKey(0))),
                             f"init_from {config.init_from}")
        self.optimizer, self.schedule = optimizer.make(config.optimizer, config.train.steps, decay_mask=decay_mask)
        self.cond_key = COND_SOURCES[config.cond.source]

    def reconstruction_loss(self, logits_BLV: jax.Array, target_BD: jax.Array, weight_B: jax.Array) -> jax.Array:
        raise ValueError("cond.reconstruction_weight > 0 decodes through the frozen VQGAN and CLIP: use PriorStage")

    def init_state(self, rng: jax.Array) -> loop.TrainState:
        init_rng, state_rng = jax.random.split(rng)
        params = prior_lib.init_params(self.model, init_rng)
        return loop.TrainState(step=jnp.asarray(0, jnp.int32), params=params, opt_state=self.optimizer.init(params),
                               rng=state_rng)

    def initial_params(self):
        """The params training starts from: `init_from`'s, or None for the random init."""
        return self.init_from_params

    def _loss(self, params, batch: dict, rng: jax.Array, *, train: bool) -> tuple[jax.Array, dict]:
        cfg = self.config.cond
        tokens_BL = batch[precomputed.TOKENS].astype(jnp.int32)
        cond_rng, dropout_rng = jax.random.split(rng)
        target_BD = numerics.l2_normalise(batch[self.cond_key].astype(jnp.float32))
        if train:
            cond_BD, use_null_B = condition(target_BD, cond_rng, noise=cfg.noise, dropout=cfg.dropout)
        else:  # evaluation conditions on the clean embedding, as sampling does
            cond_BD, use_null_B = target_BD, jnp.zeros(tokens_BL.shape[:1], jnp.bool_)
        logits_BLV = self.model.apply({"params": params}, cond_BD, tokens_BL, use_null_B=use_null_B,
                                      deterministic=not train, rngs={"dropout": dropout_rng})
        cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits_BLV, tokens_BL).mean()
        terms = {"cross_entropy": cross_entropy,
                 "accuracy": jnp.mean(jnp.argmax(logits_BLV, axis=-1) == tokens_BL)}
        loss = cross_entropy
        if cfg.reconstruction_weight > 0:
            # Rows that saw the null embedding have no condition to reconstruct.
            terms["reconstruction"] = self.reconstruction_loss(logits_BLV, target_BD,
                                                               (~use_null_B).astype(jnp.float32))
            loss = loss + cfg.reconstruction_weight * terms["reconstruction"]
        return loss, terms

    def gradients(self, params, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict, dict]:
        """(loss, terms, gradients), averaged over `optimizer.accumulation_steps` equal micro-batches run one after
        another (activation memory of one micro-batch)."""
        grad_fn = jax.value_and_grad(functools.partial(self._loss, train=True), has_aux=True)
        steps = self.config.optimizer.accumulation_steps
        if steps == 1:
            (loss, terms), grads = grad_fn(params, batch, jax.random.fold_in(rng, 0))
            return loss, terms, grads
        # Micro-batch j takes rows j, j + steps, ...: each one stays spread over every device of the batch axis.
        micro_batches = jax.tree.map(lambda x: jnp.swapaxes(x.reshape((-1, steps) + x.shape[1:]), 0, 1), batch)

        def accumulate(totals, inputs):
            index, micro_batch = inputs
            (loss, terms), grads = grad_fn(params, micro_batch, jax.random.fold_in(rng, index))
            return jax.tree.map(jnp.add, totals, (loss, terms, grads)), None

        (loss_shape, terms_shape), grads_shape = jax.eval_shape(
            grad_fn, params, jax.tree.map(lambda x: x[0], micro_batches), rng)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss_shape, terms_shape, grads_shape))
        totals, _ = jax.lax.scan(accumulate, zeros, (jnp.arange(steps), micro_batches))
        return jax.tree.map(lambda total: total / steps, totals)

    def train_step(self, state: loop.TrainState, batch: dict) -> tuple[loop.TrainState, loop.Metrics]:
        loss, terms, grads = self.gradients(state.params, batch, jax.random.fold_in(state.rng, state.step))
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, **terms, "grad_norm": optax.tree.norm(grads),
                   "learning_rate": self.schedule(state.step)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def eval_step(self, state: loop.TrainState, batch: dict):
        loss, terms = self._loss(state.params, batch, state.rng, train=False)
        return {"loss": loss, **terms}, {}


class PriorStage(PriorSteps):
    """The training stage: PriorSteps on a precomputed dataset, checked against the frozen VQGAN and CLIP it was made
    with, which also serve the reconstruction loss and the evaluation by sampling."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | pathlib.Path | None = None):
        super().__init__(config)
        check_frozen_models_named(config)
        self.workdir = None if workdir is None else pathlib.Path(workdir)
        dtype = parallel.compute_dtype(config.train.compute_dtype)
        data = config.data
        dataset = f"the precomputed dataset {precomputed.dataset_dir(data.data_dir, data.name)}"
        self.dataset_metadata = precomputed.load_metadata(data.data_dir, data.name)
        self.vqgan_path = checkpointing.bundle_path(config.vqgan, "vqgan")
        self.vqgan, self.vqgan_params, vqgan_metadata = checkpointing.load_vqgan(self.vqgan_path, dtype)
        self.clip = clip_lib.load(config.clip, dtype=dtype)
        self.identities = {"vqgan": precomputed.vqgan_identity(self.vqgan_path, self.vqgan_params,
                                                               vqgan_metadata["model"]),
                           "clip": precomputed.clip_identity(self.clip)}
        precomputed.check_identity(self.dataset_metadata, **self.identities, dataset=dataset)
        if self.init_from_metadata is not None:  # fine-tuning on tokens of another VQGAN would start from noise
            pipeline.check_models(self.init_from_metadata, config.init_from, self.identities["vqgan"],
                                  self.identities["clip"])
        check_model_fits(config.model, self.dataset_metadata, dataset)
        if self.cond_key == precomputed.TEXT_EMBEDDING and self.dataset_metadata.get("caption_key") is None:
            raise ValueError(f"cond.source='text' needs caption embeddings, but {dataset} has no captions; use "
                             "cond.source='image' or precompute a captioned source")
        self.grid_shape = tuple(self.dataset_metadata["grid_shape"])

        # Evaluation prompts: on Shapes the canonical captions of the held-out tuning half (the oracle scores them; the
        # test half stays for the reported figures, docs/SHAPES.md), else eval.prompts.
        self.is_shapes = (self.dataset_metadata["source"]["source"] == "shapes"
                          and bool(self.dataset_metadata.get("labels")))
        if self.is_shapes:
            tuning = [shapes.heldout_combinations()[i] for i in shapes.heldout_half("tuning")]
            self.eval_attributes = tuning[:config.eval.heldout_prompts]
            self.eval_prompts = [shapes.canonical_caption(attrs) for attrs in self.eval_attributes]
        else:
            self.eval_attributes, self.eval_prompts = None, list(config.eval.prompts)
        self._eval_pipeline = None  # built at the first evaluation (it embeds the prompts once)
        self._eval_queries_PD = None
        self.last_host_eval: tuple[int, dict[str, float]] | None = None

    # -- what the loop calls ---------------------------------------------------------------------------------------

    def make_batch_iterator(self, data_config: ml_collections.ConfigDict, **kwargs
                            ) -> precomputed.PrecomputedBatchIterator:
        return precomputed.make_batch_iterator(data_config.data_dir, data_config.name,
                                               keys=(precomputed.TOKENS, self.cond_key),
                                               worker_count=data_config.worker_count, **kwargs)

    def reconstruction_loss(self, logits_BLV: jax.Array, target_BD: jax.Array, weight_B: jax.Array) -> jax.Array:
        """Weighted mean over rows of 1 - cos(CLIP(VQGAN decode(straight-through argmax codes)), target).

        The forward pass decodes exactly the argmax tokens; the gradient is the softmax's (straight-through), which
        reaches the logits through the frozen decoder and CLIP."""
        probs_BLV = jax.nn.softmax(logits_BLV.astype(jnp.float32), axis=-1)
        hard_BLV = jax.nn.one_hot(jnp.argmax(logits_BLV, axis=-1), logits_BLV.shape[-1], dtype=jnp.float32)
        one_hot_BLV = hard_BLV + probs_BLV - jax.lax.stop_gradient(probs_BLV)
        # The frozen models' params enter the jitted step as constants: cheap at Shapes scale; the paper's models
        # would compile slower (the loop's step takes only (state, batch)).
        codebook_KD = self.vqgan.apply({"params": self.vqgan_params}, method=self.vqgan.codebook)
        codes_BhwD = (one_hot_BLV @ codebook_KD).reshape((logits_BLV.shape[0],) + self.grid_shape + (-1,))
        images_BHWC = self.vqgan.apply({"params": self.vqgan_params}, codes_BhwD, method=self.vqgan.decode_codes)
        features_BD = self.clip.image_features(self.clip.params, images_BHWC, round_to_uint8=False)
        distance_B = 1.0 - jnp.sum(features_BD * target_BD, axis=-1)
        return jnp.sum(distance_B * weight_B) / jnp.maximum(jnp.sum(weight_B), 1.0)

    def host_eval(self, state: loop.TrainState) -> dict[str, float]:
        """Samples the evaluation prompts (their text embeddings; 1 sample each, no re-ranking, a fixed seed; prompt
        index = position, on Shapes the held-out combination's index, as in tools/evaluate.py) into a grid PNG in
        workdir/images; on Shapes returns the oracle's per-attribute and all-attribute accuracies."""
        if not self.eval_prompts:
            return {}
        # Host copies: sampling then runs where the frozen VQGAN's params live (one device of this process), not on
        # the training mesh, whose devices a jitted call cannot mix with those (nor, under FSDP or several
        # processes, read back whole). Every process samples the same images.
        prior_params = parallel.to_host(state.params)
        if self._eval_pipeline is None:
            self._eval_pipeline = pipeline.Pipeline(
                prior=self.model, prior_params=prior_params, vqgan=self.vqgan, vqgan_params=self.vqgan_params,
                clip=self.clip, metadata={"cond": self.config.cond.to_dict()})
            self._eval_queries_PD = self._eval_pipeline.embed_texts(self.eval_prompts)
        self._eval_pipeline.prior_params = prior_params
        e = self.config.eval
        images_PKHWC, _ = self._eval_pipeline.generate_from_embeddings(
            self._eval_queries_PD, num_candidates=1, keep=1, temperature=e.temperature, top_k=e.top_k, top_p=e.top_p,
            guidance_scale=e.guidance_scale, seed=self.config.seed, batch_size=e.batch_size)
        step = int(state.step)
        name = "heldout_samples" if self.is_shapes else "prompt_samples"
        if self.workdir is not None and jax.process_index() == 0:
            (self.workdir / "images").mkdir(parents=True, exist_ok=True)
            Image.fromarray(writer.image_grid(images_PKHWC[:, 0])).save(
                self.workdir / "images" / f"{name}_{step:08d}.png")
        scores = {}
        if self.is_shapes:
            scores = {f"shapes/{k}": v for k, v in shapes.score_images(images_PKHWC[:, 0],
                                                                      self.eval_attributes).items()}
        self.last_host_eval = (step, scores)
        return scores


def train(config: ml_collections.ConfigDict, workdir: str) -> loop.TrainState:
    """Trains, then exports the prior as an inference bundle in `workdir/export`."""
    stage = PriorStage(config, workdir)
    start = time.perf_counter()
    state = loop.run(config, workdir, stage)
    train_seconds = time.perf_counter() - start
    params = parallel.to_host(state.params)  # every process: a collective under FSDP
    if jax.process_index() == 0:
        export_dir = pathlib.Path(workdir) / checkpointing.EXPORT_DIR
        metadata = pipeline.prior_metadata(config.to_dict(), vqgan_path=stage.vqgan_path, step=int(state.step),
                                           identities=stage.identities, bundle_dir=export_dir)
        # Wall time of the invocation that finished the run (compilation included; a resumed run counts its part).
        metadata["train_seconds_last_invocation"] = round(train_seconds, 1)
        if stage.last_host_eval is not None and stage.last_host_eval[0] == int(state.step):
            metadata["eval"] = stage.last_host_eval[1]
        checkpointing.save_bundle(export_dir, params, metadata, overwrite=True)
        logger.info("exported the prior to %s (load it with clipgen_jax.pipeline.Pipeline.load)", export_dir)
    return state
