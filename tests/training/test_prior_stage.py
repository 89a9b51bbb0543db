"""The prior stage: conditioning switches, optimizer pieces, the reconstruction loss, gradient accumulation, the
dataset identity check, and a tiny run that trains, evaluates on held-out Shapes prompts and exports a bundle that the
pipeline loads (as it does the run's latest checkpoint)."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import save_vqgan, tiny_prior_config

from clipgen_jax import checkpointing, pipeline, training
from clipgen_jax.data import precomputed
from clipgen_jax.models import prior as prior_lib
from clipgen_jax.training import prior as prior_training


@pytest.fixture
def dataset(prior_dataset):
    """tests/conftest.py prior_dataset: (vqgan path, clip path, data_dir)."""
    return prior_dataset


def _config(dataset, **cond):
    vqgan_path, clip_path, data_dir = dataset
    config = tiny_prior_config(vqgan_path, clip_path)
    config.data.data_dir = str(data_dir)
    config.cond.update(cond)
    return config


def _batch(stage, size=8):
    iterator = stage.make_batch_iterator(stage.config.data, split="validation", batch_size=size, seed=0,
                                         shuffle=False, num_epochs=1)
    return {k: jnp.asarray(v) for k, v in next(iterator).items()}


def test_condition_normalises_adds_lafite_noise_and_drops_to_null():
    rng = jax.random.PRNGKey(3)
    embedding_BD = jax.random.normal(jax.random.PRNGKey(0), (4000, 16)) * 5.0
    unit_BD = embedding_BD / jnp.linalg.norm(embedding_BD, axis=-1, keepdims=True)

    cond_BD, use_null_B = prior_training.condition(embedding_BD, rng, noise=0.0, dropout=0.0)
    np.testing.assert_allclose(cond_BD, unit_BD, atol=1e-6)
    assert use_null_B.dtype == jnp.bool_ and not use_null_B.any()

    noise_rng = jax.random.split(rng)[0]
    gaussian_BD = jax.random.normal(noise_rng, embedding_BD.shape)
    expected_BD = unit_BD + 0.5 * gaussian_BD / jnp.linalg.norm(gaussian_BD, axis=-1, keepdims=True)
    expected_BD /= jnp.linalg.norm(expected_BD, axis=-1, keepdims=True)
    noisy_BD, use_null_B = prior_training.condition(embedding_BD, rng, noise=0.5, dropout=0.0)
    np.testing.assert_allclose(noisy_BD, expected_BD, atol=1e-6)
    np.testing.assert_allclose(jnp.linalg.norm(noisy_BD, axis=-1), 1.0, atol=1e-6)
    assert not use_null_B.any()
    cosines = [float(jnp.mean(jnp.sum(prior_training.condition(embedding_BD, rng, noise=xi, dropout=0.0)[0] * unit_BD,
                                      axis=-1))) for xi in (0.1, 0.5, 2.0)]
    assert cosines[0] > cosines[1] > cosines[2] > 0  # a unit perturbation of relative size xi

    cond_BD, use_null_B = prior_training.condition(embedding_BD, rng, noise=0.0, dropout=0.25)
    np.testing.assert_allclose(cond_BD, unit_BD, atol=1e-6)  # dropout only flags rows; the model swaps them
    assert abs(float(use_null_B.mean()) - 0.25) < 0.03


def test_decay_mask_covers_matrices_only_also_when_layers_are_scanned():
    for scan in (False, True):
        model = prior_lib.Prior(vocab_size=32, num_tokens=4, cond_dim=8, width=16, depth=2, num_heads=2,
                                scan_layers=scan)
        params = jax.eval_shape(lambda: prior_lib.init_params(model, jax.random.PRNGKey(0)))
        mask = prior_training.decay_mask(params)
        decayed = {jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(mask) if leaf}
        kept = {jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(mask) if not leaf}
        assert decayed and all(name.endswith("['kernel']") for name in decayed)
        assert any("head" in name for name in decayed) and any("qkv" in name for name in decayed)
        assert {"['null_embedding']", "['position_embedding']", "['token_embedding']['embedding']"} <= kept
        assert all(name.endswith(("['bias']", "['scale']", "embedding']")) for name in kept)


def test_text_mode_conditions_on_the_caption_embeddings(dataset):
    stage = prior_training.PriorStage(_config(dataset, source="text"))
    batch = _batch(stage)
    assert set(batch) == {"tokens", "clip_text_embedding"}
    params = prior_lib.init_params(stage.model, jax.random.PRNGKey(0))
    loss, terms = stage._loss(params, batch, jax.random.PRNGKey(0), train=True)
    image_stage = prior_training.PriorStage(_config(dataset, source="image"))
    image_batch = _batch(image_stage)
    assert set(image_batch) == {"tokens", "clip_image_embedding"}
    image_loss, _ = image_stage._loss(params, image_batch, jax.random.PRNGKey(0), train=True)
    assert np.isfinite(loss) and float(loss) != float(image_loss)
    assert float(terms["cross_entropy"]) == pytest.approx(np.log(64), rel=0.05)  # a fresh model is near uniform


def test_reconstruction_loss_is_positive_and_has_finite_gradients(dataset):
    stage = prior_training.PriorStage(_config(dataset, reconstruction_weight=0.5, dropout=0.25))
    batch = _batch(stage)
    params = prior_lib.init_params(stage.model, jax.random.PRNGKey(0))
    loss, terms, grads = jax.jit(stage.gradients)(params, batch, jax.random.PRNGKey(1))
    # A random CLIP embeds all images nearly alike, so the distance to the data's own embeddings is small, not 0.
    assert 0.0 < float(terms["reconstruction"]) < 2.0
    assert float(loss) == pytest.approx(float(terms["cross_entropy"]) + 0.5 * float(terms["reconstruction"]),
                                        rel=1e-5)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    state = stage.init_state(jax.random.PRNGKey(0))
    state, metrics = jax.jit(stage.train_step)(state, batch)
    assert int(state.step) == 1 and all(np.isfinite(float(v)) for v in metrics.values())
    assert set(metrics) == {"loss", "cross_entropy", "accuracy", "reconstruction", "grad_norm", "learning_rate"}


def test_reconstruction_decodes_the_argmax_tokens_with_a_straight_through_softmax_gradient(dataset):
    stage = prior_training.PriorStage(_config(dataset, reconstruction_weight=1.0))
    logits_BLV = 3.0 * jax.random.normal(jax.random.PRNGKey(0), (2, 256, 64))
    target_BD = jax.random.normal(jax.random.PRNGKey(1), (2, 16))
    target_BD /= jnp.linalg.norm(target_BD, axis=-1, keepdims=True)
    weight_B = jnp.array([1.0, 0.0])  # the second row (a null-conditioned one) does not count

    def image_distance(one_hot_BLV):
        codebook_KD = stage.vqgan.apply({"params": stage.vqgan_params}, method=stage.vqgan.codebook)
        images = stage.vqgan.apply({"params": stage.vqgan_params}, (one_hot_BLV @ codebook_KD).reshape(2, 16, 16, -1),
                                   method=stage.vqgan.decode_codes)
        features_BD = stage.clip.image_features(stage.clip.params, images, round_to_uint8=False)
        return 1.0 - jnp.sum(features_BD[0] * target_BD[0])

    loss, grad_BLV = jax.value_and_grad(stage.reconstruction_loss)(logits_BLV, target_BD, weight_B)
    tokens_BL = jnp.argmax(logits_BLV, axis=-1)
    images = stage.vqgan.apply({"params": stage.vqgan_params}, tokens_BL.reshape(2, 16, 16),
                               method=stage.vqgan.decode)
    features_BD = stage.clip.image_features(stage.clip.params, images, round_to_uint8=False)
    expected = 1.0 - jnp.sum(features_BD[0] * target_BD[0])
    assert float(loss) == pytest.approx(float(expected), abs=1e-5) and float(loss) > 0.5
    # d loss / d logits = softmax's vector-Jacobian product of d loss / d one-hot at the hard one-hot.
    hard_grad_BLV = jax.grad(image_distance)(jax.nn.one_hot(tokens_BL, 64))
    _, softmax_vjp = jax.vjp(lambda x: jax.nn.softmax(x, axis=-1), logits_BLV)
    (expected_grad_BLV,) = softmax_vjp(hard_grad_BLV)
    assert float(jnp.linalg.norm(grad_BLV)) > 0 and bool(jnp.all(jnp.isfinite(grad_BLV)))
    np.testing.assert_allclose(grad_BLV, expected_grad_BLV, rtol=1e-3, atol=1e-4 * float(jnp.abs(grad_BLV).max()))
    assert not bool(jnp.any(grad_BLV[1]))


def test_accumulated_micro_batches_give_the_full_batch_gradient(dataset):
    # Without dropout: each micro-batch draws its own masks, so with dropout the two gradients differ by design.
    config = _config(dataset)
    config.model.dropout_rate = 0.0
    whole = prior_training.PriorStage(config)
    config = _config(dataset)
    config.model.dropout_rate = 0.0
    config.optimizer.accumulation_steps = 4
    accumulated = prior_training.PriorStage(config)
    batch = _batch(whole)
    params = prior_lib.init_params(whole.model, jax.random.PRNGKey(0))
    loss, terms, grads = jax.jit(whole.gradients)(params, batch, jax.random.PRNGKey(1))
    loss_4, terms_4, grads_4 = jax.jit(accumulated.gradients)(params, batch, jax.random.PRNGKey(1))
    assert float(loss_4) == pytest.approx(float(loss), rel=1e-5)
    assert float(terms_4["accuracy"]) == pytest.approx(float(terms["accuracy"]), abs=1e-6)
    for g, g_4 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_4)):
        np.testing.assert_allclose(g_4, g, rtol=1e-4, atol=1e-7)
    config.optimizer.accumulation_steps = 3
    with pytest.raises(ValueError, match="accumulation_steps=3 must be a positive divisor of train.batch_size=8"):
        prior_training.PriorStage(config)


def test_a_dataset_made_with_another_vqgan_or_a_misfit_model_is_refused(dataset, tmp_path):
    config = _config(dataset)
    config.vqgan = str(save_vqgan(tmp_path / "other_vqgan", seed=1))
    with pytest.raises(precomputed.IdentityMismatchError, match=r"was precomputed with VQGAN .* weights_hash"):
        prior_training.PriorStage(config)
    config = _config(dataset)
    config.model.vocab_size = 128
    with pytest.raises(ValueError, match="model.vocab_size=128 but the precomputed dataset .* has 64"):
        prior_training.PriorStage(config)
    config = _config(dataset, source="caption")
    with pytest.raises(ValueError, match="cond.source='caption' is not one of"):
        prior_training.PriorStage(config)


def test_tiny_run_trains_scores_heldout_prompts_and_exports_a_loadable_bundle(dataset, tmp_path):
    config = _config(dataset, noise=0.1, dropout=0.1)
    workdir = tmp_path / "run"
    state = training.train(config, str(workdir))
    assert int(state.step) == 4

    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    merged = {k: v for record in records for k, v in record.items()}
    for key in ("train/loss", "train/accuracy", "train/grad_norm", "train/learning_rate", "eval/loss",
                "eval/accuracy", "eval/shapes/all", "eval/shapes/shape", "eval/shapes/background"):
        assert key in merged and np.isfinite(merged[key]), key
    assert merged["train/loss"] == pytest.approx(np.log(64), rel=0.1)
    assert 0.0 <= merged["eval/shapes/all"] <= 1.0
    assert (workdir / "images" / "heldout_samples_00000004.png").is_file()

    export = workdir / "export"
    metadata = checkpointing.load_bundle_metadata(export)
    assert metadata["kind"] == "prior" and metadata["step"] == 4
    assert metadata["model"] == {k: config.model[k] for k in prior_lib.CONFIG_FIELDS}
    assert metadata["cond"] == {"source": "image", "noise": 0.1, "dropout": 0.1, "reconstruction_weight": 0.0}
    assert metadata["vqgan"] == str(dataset[0]) and metadata["clip"] == str(dataset[1])
    assert set(metadata["eval"]) >= {"shapes/all", "shapes/shape"}
    assert metadata["identities"]["clip"]["embed_dim"] == 16

    from_export = pipeline.Pipeline.load(workdir)
    final = [np.asarray(x) for x in jax.tree.leaves(state.params)]
    for a, b in zip(jax.tree.leaves(from_export.prior_params), final):
        np.testing.assert_array_equal(a, b)
    images, scores = from_export.generate(["a small red circle in the top left on a black background"],
                                          num_candidates=2, keep=1, batch_size=4)
    assert images.shape == (1, 1, 32, 32, 3) and scores.shape == (1, 1)

    # Without the export (a run still training), the latest checkpoint's params load.
    shutil.rmtree(export)
    from_checkpoint = pipeline.Pipeline.load(workdir)
    assert from_checkpoint.metadata["step"] == 4 and from_checkpoint.metadata["identities"] is not None
    for a, b in zip(jax.tree.leaves(from_checkpoint.prior_params), final):
        np.testing.assert_array_equal(a, b)


def test_presets_name_their_data_models_and_a_known_model():
    for preset in ("shapes", "gpt2_medium", "gpt2_large", "tiny"):
        config = training.load_config(f"configs/prior.py:{preset}")
        assert config.stage == "prior" and set(config.model) == set(prior_lib.CONFIG_FIELDS)
        assert config.optimizer.b1 == 0.9 and config.optimizer.b2 == 0.95
        assert config.cond.to_dict() == {"source": "image", "noise": 0.0, "dropout": 0.0,
                                         "reconstruction_weight": 0.0}
    shapes_config = training.load_config("configs/prior.py:shapes")
    assert (shapes_config.data.data_dir, shapes_config.data.name) == ("runs/precomputed", "shapes_s32")
    assert (shapes_config.vqgan, shapes_config.clip) == ("runs/vqgan", "shapes-clip")
    for preset in prior_lib.PRESETS:
        assert training.load_config(f"configs/prior.py:{preset}").model.to_dict() == prior_lib.PRESETS[preset]
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        training.load_config("configs/prior.py:huge")
