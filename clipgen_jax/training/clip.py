"""Stage: a CLIP of your own. Trains transformers' FlaxCLIPModel (any CLIPConfig, from scratch or fine-tuned from a
loaded CLIP) with the symmetric InfoNCE loss and a learnable temperature, on any captioned source (`data/captions.py`).

Hard negatives (Shapes only, `captions.hard_negatives`): each image also meets K captions of combinations one
attribute away, in the same wording, in its image -> text softmax (NegCLIP-style). They are what teaches a small CLIP
the attributes that random in-batch negatives rarely contrast, position above all.

The run ends by exporting `workdir/export`: config.json, model.safetensors (PyTorch naming), tokenizer and
preprocessor files, so the result loads through `models.clip.load(path)` exactly like a Hub CLIP.
"""

from __future__ import annotations

import copy
import json
import logging
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import transformers

from clipgen_jax import optimizer, parallel
from clipgen_jax.data import captions, images
from clipgen_jax.evaluation import clip_scores
from clipgen_jax.models import clip as clip_lib
from clipgen_jax.models import clip_tokenizer
from clipgen_jax.training import loop

logger = logging.getLogger(__name__)

MAX_LOGIT_SCALE = 100.0  # CLIP clamps its learnt temperature so logits stay at most 100x the cosine


def default_model_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        init_from=ml_collections.config_dict.placeholder(str),  # Hub id / directory / packaged name to fine-tune
        image_size=224, patch_size=32, vision_width=768, vision_layers=12, vision_heads=12,
        text_width=512, text_layers=12, text_heads=8, context_length=77,
        projection_dim=512, hidden_act="quick_gelu", logit_scale_init=2.6592,  # ln(1 / 0.07), as CLIP
        # Std of the vision position embeddings at init; 0 keeps transformers' (0.01). The patch embedding starts
        # about ten times larger, which drowns where a patch is in what it shows; a larger start helps position.
        vision_position_init_std=0.0,
    ))


def clip_config(model_config: ml_collections.ConfigDict) -> transformers.CLIPConfig:
    """The CLIPConfig a model config describes (OpenAI's tokenizer ids: BOS 49406, EOS = pad 49407)."""
    m = model_config
    return transformers.CLIPConfig(
        text_config=dict(vocab_size=clip_tokenizer.VOCAB_SIZE, hidden_size=m.text_width,
                         intermediate_size=4 * m.text_width, num_hidden_layers=m.text_layers,
                         num_attention_heads=m.text_heads, max_position_embeddings=m.context_length,
                         hidden_act=m.hidden_act, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(image_size=m.image_size, patch_size=m.patch_size, hidden_size=m.vision_width,
                           intermediate_size=4 * m.vision_width, num_hidden_layers=m.vision_layers,
                           num_attention_heads=m.vision_heads, hidden_act=m.hidden_act),
        projection_dim=m.projection_dim, logit_scale_init_value=m.logit_scale_init)


def _decay_mask(params):
    """Weight decay on matrices only: not on biases, norms, embeddings, the class token or the temperature."""
    def decays(path, leaf):
        name = jax.tree_util.keystr(path)
        return leaf.ndim > 1 and "embedding" not in name
    return jax.tree_util.tree_map_with_path(decays, params)


def contrastive_loss(image_emb_BD: jax.Array, text_emb_BD: jax.Array, logit_scale: jax.Array,
                     hard_negative_emb_BKD: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Symmetric InfoNCE over a batch of matched (image, text) pairs -> (loss, image -> text top-1 accuracy).

    Hard negatives join only each image's own row of the image -> text softmax.
    """
    scale = jnp.exp(logit_scale)
    logits_BB = scale * image_emb_BD @ text_emb_BD.T
    labels = jnp.arange(logits_BB.shape[0])
    image_to_text = logits_BB
    if hard_negative_emb_BKD is not None:
        hard_BK = scale * jnp.einsum("bd,bkd->bk", image_emb_BD, hard_negative_emb_BKD)
        image_to_text = jnp.concatenate([logits_BB, hard_BK], axis=1)
    loss_i2t = optax.softmax_cross_entropy_with_integer_labels(image_to_text, labels).mean()
    loss_t2i = optax.softmax_cross_entropy_with_integer_labels(logits_BB.T, labels).mean()
    accuracy = jnp.mean(jnp.argmax(image_to_text, axis=1) == labels)
    return (loss_i2t + loss_t2i) / 2, accuracy


class ClipStage:

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        dtype = parallel.compute_dtype(config.train.compute_dtype)
        m = config.model
        if m.init_from:
            loaded = clip_lib.load(m.init_from, dtype=dtype)
            model, self.pretrained = loaded.model, loaded.params
            tokenizer, preprocessing = loaded.tokenizer, loaded.preprocessing
        else:
            model = transformers.FlaxCLIPModel(clip_config(m), dtype=dtype, _do_init=False)
            self.pretrained = None
            tokenizer = clip_tokenizer.openai_tokenizer(m.context_length)
            preprocessing = clip_lib.Preprocessing(shortest_edge=m.image_size, crop_size=m.image_size)
        self.clip = clip_lib.CLIP(model=model, params=self.pretrained, tokenizer=tokenizer,
                                  preprocessing=preprocessing, name="training")
        self.optimizer, self.schedule = optimizer.make(config.optimizer, config.train.steps, decay_mask=_decay_mask)

    # -- what the loop calls ---------------------------------------------------------------------------------------

    def make_batch_iterator(self, data_config: ml_collections.ConfigDict, **kwargs) -> images.ImageBatchIterator:
        # A copy of the tokenizer: the fast tokenizer is not thread-safe, and the pipeline's reader threads would
        # otherwise share it with host_eval's embed_texts ("Already borrowed").
        return captions.make_batch_iterator(data_config, self.config.captions, copy.deepcopy(self.clip.tokenizer),
                                            self.clip.context_length, **kwargs)

    def init_state(self, rng: jax.Array) -> loop.TrainState:
        init_rng, state_rng = jax.random.split(rng)
        model = self.clip.model
        size = model.config.vision_config.image_size
        params = model.init_weights(init_rng, ((1, self.clip.context_length), (1, size, size, 3)))
        position_std = self.config.model.vision_position_init_std
        if position_std:
            embedding = params["vision_model"]["embeddings"]["position_embedding"]
            embedding["embedding"] = position_std * jax.random.normal(
                jax.random.fold_in(init_rng, 1), embedding["embedding"].shape, embedding["embedding"].dtype)
        return loop.TrainState(step=jnp.asarray(0, jnp.int32), params=params, opt_state=self.optimizer.init(params),
                               rng=state_rng)

    def initial_params(self):
        """Fine-tuning starts from the loaded CLIP's params (None: from the random init)."""
        return self.pretrained

    def _loss(self, params, batch):
        image_emb = self.clip.image_features(params, batch["image"])
        text_emb = self.clip.text_features(params, batch["input_ids"], batch["attention_mask"])
        hard = None
        if "hard_negative_ids" in batch:
            batch_size, count, length = batch["hard_negative_ids"].shape
            hard = self.clip.text_features(params, batch["hard_negative_ids"].reshape(batch_size * count, length),
                                           batch["hard_negative_mask"].reshape(batch_size * count, length))
            hard = hard.reshape(batch_size, count, -1)
        return contrastive_loss(image_emb, text_emb, params["logit_scale"], hard)

    def train_step(self, state: loop.TrainState, batch: dict) -> tuple[loop.TrainState, loop.Metrics]:
        (loss, accuracy), grads = jax.value_and_grad(self._loss, has_aux=True)(state.params, batch)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        params["logit_scale"] = jnp.clip(params["logit_scale"], 0.0, np.log(MAX_LOGIT_SCALE))
        metrics = {"loss": loss, "image_to_text_accuracy": accuracy, "grad_norm": optax.tree.norm(grads),
                   "temperature": jnp.exp(-params["logit_scale"]), "learning_rate": self.schedule(state.step)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def eval_step(self, state: loop.TrainState, batch: dict):
        loss, accuracy = self._loss(state.params, batch)
        return {"loss": loss, "image_to_text_accuracy": accuracy}, {}

    def host_eval(self, state: loop.TrainState) -> dict[str, float]:
        """On Shapes: zero-shot accuracy per attribute and text -> image retrieval, the curves the README reports."""
        if not (self.config.eval.shapes_zero_shot and images.is_shapes(self.config.data)):
            return {}
        self.clip.params = state.params
        scores = clip_scores.shapes_scores(self.clip, self.config.data, batch_size=self.config.train.eval_batch_size)
        return {f"shapes/{key}": value for key, value in scores.items()}


def train(config: ml_collections.ConfigDict, workdir: str) -> loop.TrainState:
    stage = ClipStage(config)
    start = time.perf_counter()
    state = loop.run(config, workdir, stage)
    train_seconds = time.perf_counter() - start
    params = parallel.to_host(state.params)  # every process: a collective under FSDP
    if jax.process_index() == 0:
        export_dir = pathlib.Path(workdir) / "export"
        stage.clip.params = params
        metadata = {"trained_by": "clipgen_jax tools/train.py", "stage": "clip", "steps": int(state.step),
                    # Wall time of the invocation that finished the run (compilation included; a resumed run
                    # counts only its last part).
                    "train_seconds_last_invocation": round(train_seconds, 1),
                    "devices": [str(d.device_kind) for d in jax.devices()],
                    "config": json.loads(config.to_json_best_effort())}
        if config.eval.shapes_zero_shot and images.is_shapes(config.data):
            metadata["shapes_scores"] = stage.host_eval(state)
        clip_lib.export(stage.clip.model, stage.clip.params, stage.clip.tokenizer, stage.clip.preprocessing,
                        export_dir, dtype=config.export_dtype, metadata=metadata)
        logger.info("exported the CLIP to %s (load it with clipgen_jax.models.clip.load)", export_dir)
    return state
