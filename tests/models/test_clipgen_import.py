"""Importing CLIP-GEN's official models: the converted bundles reproduce the official PyTorch code's outputs, stored in
tests/fixtures/clipgen/ by tests/fixtures/make_clipgen_fixtures.py (tiny official models with random weights, saved
with torch.save as the official scripts save them), through both checkpoint readers; the restricted reader refuses
code; a file that does not match is one line naming the tensor.
"""

import json
import logging
import pathlib
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipgen_jax import checkpointing, pipeline, safe_pickle
from clipgen_jax.models import clipgen_import, taming_import

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = REPO_ROOT / "tests" / "fixtures" / "clipgen"
# Heads are not in the weights; these are the fixture configurations' (make_clipgen_fixtures.CONFIGS).
HEADS = {"single_attention": 4, "multi_attention": 3}
TOLERANCE = 1e-4


def official_files(name: str) -> tuple[pathlib.Path, pathlib.Path, dict]:
    """The official VQGAN and GPT checkpoints of a fixture configuration, and the official outputs."""
    outputs = np.load(FIXTURES / f"{name}_outputs.npz")
    return FIXTURES / f"{name}_vqgan.pt", FIXTURES / f"{name}_gpt.pt", {k: outputs[k] for k in outputs.files}


def convert(name: str, out: pathlib.Path, **kwargs) -> pathlib.Path:
    vqgan_ckpt, gpt_ckpt, _ = official_files(name)
    return clipgen_import.convert(vqgan_ckpt, gpt_ckpt, out, num_heads=HEADS[name], **kwargs)


def _max_abs_difference(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("reader", ["torch", "restricted"])
@pytest.mark.parametrize("name", sorted(HEADS))
def test_converted_bundles_reproduce_the_official_outputs(name, reader, tmp_path):
    if reader == "torch":
        pytest.importorskip("torch")
    _, _, official = official_files(name)
    bundle = convert(name, tmp_path / "converted", reader=reader)

    model, params, metadata, _ = pipeline.load_prior(bundle)  # the loaders Pipeline.load uses
    vqgan_model, vqgan_params, _ = checkpointing.load_vqgan(metadata["vqgan"])
    tokens_BL = jnp.asarray(official["gpt_tokens"], jnp.int32)
    logits_BLV = jax.jit(model.apply)({"params": params}, official["gpt_embedding"], tokens_BL)

    # The sampler's path: the prefix, then one token at a time through the KV cache.
    cache = model.init_cache(len(tokens_BL))
    first_BV, cache = model.apply({"params": params}, official["gpt_embedding"], cache, method=model.prefill)
    decode = jax.jit(lambda token_B, index, cache: model.apply({"params": params}, token_B, index, cache,
                                                                method=model.decode))
    cached = [first_BV]
    for index in range(tokens_BL.shape[1] - 1):
        logits_BV, cache = decode(tokens_BL[:, index], index, cache)
        cached.append(logits_BV)

    decoded, codes, losses, latents = jax.jit(vqgan_model.apply)({"params": vqgan_params}, official["images"])
    decoded_from_codes = vqgan_model.apply({"params": vqgan_params}, jnp.asarray(official["vqgan_codes"], jnp.int32),
                                           method=vqgan_model.decode)
    differences = {
        "logits": _max_abs_difference(logits_BLV, official["gpt_logits"]),
        "cached logits": _max_abs_difference(jnp.stack(cached, axis=1), official["gpt_logits"]),
        "latents": _max_abs_difference(latents, official["vqgan_latents"]),
        "decoded": _max_abs_difference(decoded, official["vqgan_decoded"]),
        "decoded from the official codes": _max_abs_difference(decoded_from_codes, official["vqgan_decoded"]),
        "quantizer loss": abs(float(losses["total"]) - float(official["vqgan_quantizer_loss"]))}
    print(f"max abs differences ({name}, {reader} reader): {differences}")
    assert all(d < TOLERANCE for d in differences.values()), differences
    np.testing.assert_array_equal(codes, official["vqgan_codes"])


def test_architecture_is_read_from_the_weights(tmp_path):
    bundle = convert("multi_attention", tmp_path / "converted")
    metadata = checkpointing.load_bundle_metadata(bundle)
    assert metadata["model"] == {
        "vocab_size": 48, "num_tokens": 16, "cond_dim": 12, "width": 24, "depth": 1, "num_heads": 3, "mlp_ratio": 4,
        "num_prefix_tokens": 1, "token_conditioning": False, "dropout_rate": 0.1, "scan_layers": False,
        "remat": False, "head_bias": True, "exact_gelu": True, "inner_dropout": True}
    assert checkpointing.load_bundle_metadata(bundle / "vqgan")["model"] == {
        "ch": 32, "ch_mult": [1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [16, 8, 4], "z_channels": 8,
        "resolution": 16, "codebook_size": 48, "code_dim": 8, "quantizer": "vq", "beta": 0.2, "legacy_beta": True,
        "norm_epsilon": 1e-5}
    # The prior names its VQGAN (also relative to itself) and its CLIP, unverified when given by Hub id.
    assert metadata["vqgan"] == str(bundle / "vqgan") and metadata["vqgan_relative"] == "vqgan"
    assert metadata["clip"] == "openai/clip-vit-base-patch32"
    assert metadata["identities"]["clip"] == {"name": "openai/clip-vit-base-patch32", "weights_hash": None,
                                              "embed_dim": 12}
    assert metadata["cond"]["dropout"] == 0.0  # no trained null embedding: no guidance
    assert metadata["source"]["format"] == "clipgen" and len(metadata["source"]["sha256"]) == 64


def test_converted_model_generates_through_the_pipeline(models_dir, tmp_path, caplog):
    """Pipeline.load (what tools/generate.py and tools/evaluate.py use) takes the converted bundles as they are: with
    a local CLIP its weights are recorded and checked; a CLIP named by Hub id is unverified and loading says so once."""
    clip_path = models_dir / "clip"  # a tiny random 16-d CLIP, as the single_attention GPT's condition
    verified = convert("single_attention", tmp_path / "verified", clip=str(clip_path))
    assert checkpointing.load_bundle_metadata(verified)["identities"]["clip"]["weights_hash"]
    pipe = pipeline.Pipeline.load(verified)
    images_PKHWC, scores_PK = pipe.generate(["a red circle"], num_candidates=2, keep=1, batch_size=2)
    assert images_PKHWC.shape == (1, 1, 16, 16, 3) and np.all(np.abs(scores_PK) <= 1)

    unverified = convert("single_attention", tmp_path / "unverified")
    with caplog.at_level(logging.WARNING, logger="clipgen_jax.pipeline"):
        pipeline.Pipeline.load(unverified, clip=str(clip_path))
    warnings = [r.getMessage() for r in caplog.records if "unverified" in r.getMessage()]
    assert len(warnings) == 1 and "openai/clip-vit-base-patch32" in warnings[0], warnings


def test_float16_and_wrapped_checkpoints_with_training_entries_are_read():
    """The official files hold {'model': state_dict} beside optimizer states, epoch and so on; the multi_attention
    fixture's tensors are float16."""
    _, gpt_ckpt, _ = official_files("multi_attention")
    for reader in ("restricted", "torch"):
        if reader == "torch":
            pytest.importorskip("torch")
        state_dict = taming_import.read_state_dict(gpt_ckpt, reader=reader)
        assert state_dict["tok_emb.weight"].dtype == np.float16 and state_dict["blocks.0.mask"].dtype == np.bool_
        assert not any(key.startswith(("optimizer", "epoch", "state")) for key in state_dict)


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("blocks.0.encoder.linear2.bias"), r"missing: blocks\.0\.encoder\.linear2\.bias"),
    (lambda sd: sd.update({"head.bias": np.zeros(7, np.float32)}),
     r"mis-shaped: head\.bias \(7,\) \(expected \(64,\)\)"),
    (lambda sd: sd.update({"blocks.0.encoder.extra": np.zeros(1, np.float32)}),
     r"unexpected: blocks\.0\.encoder\.extra"),
])
def test_gpt_tensors_that_do_not_match_are_named(edit, message):
    _, gpt_ckpt, _ = official_files("single_attention")
    state_dict = taming_import.read_state_dict(gpt_ckpt, reader="restricted")
    edit(state_dict)
    with pytest.raises(clipgen_import.ClipgenImportError, match=message):
        clipgen_import.prior_params(state_dict, clipgen_import.prior_config(state_dict, num_heads=4))


def test_vqgan_tensors_that_do_not_match_are_named():
    vqgan_ckpt, _, _ = official_files("multi_attention")
    state_dict = taming_import.read_state_dict(vqgan_ckpt, reader="restricted")
    model_config = clipgen_import.vqgan_config(state_dict, grid_side=4)
    del state_dict["decoder.up.3.attn.in_proj_bias"]
    state_dict["encoder.final.3.weight"] = np.zeros((8, 8, 3, 3), np.float16)
    with pytest.raises(clipgen_import.ClipgenImportError,
                       match=r"missing: decoder\.up\.3\.attn\.in_proj_bias; mis-shaped: encoder\.final\.3\.weight "
                             r"\(8, 8, 3, 3\) \(expected \(8, 8, 1, 1\)\)$"):
        clipgen_import.vqgan_params(state_dict, model_config)


def test_head_count_defaults_by_width_and_is_required_otherwise():
    def widths(width):
        return {"tok_emb.weight": np.zeros((4, width)), "pos_emb": np.zeros((1, 4, width)),
                "cond_proj.weight": np.zeros((width, 2)), "blocks.0.encoder.linear1.weight": np.zeros((4 * width, 1))}

    assert clipgen_import.prior_config(widths(1024))["num_heads"] == 16
    assert clipgen_import.prior_config(widths(1280))["num_heads"] == 20
    assert clipgen_import.prior_config(widths(96), num_heads=6)["num_heads"] == 6
    with pytest.raises(clipgen_import.ClipgenImportError, match=r"give it \(--heads\)"):
        clipgen_import.prior_config(widths(96))


@pytest.mark.faults
def test_restricted_reader_refuses_a_planted_os_system(tmp_path, malicious_pickle):
    marker = tmp_path / "pwned"
    path = tmp_path / "gpt_coco.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", malicious_pickle(lambda payload: {"model": {}, "epoch": payload}, marker))
        archive.writestr("archive/version", "3\n")
    with pytest.raises(safe_pickle.UnsafePickleError, match="system"):
        taming_import.read_state_dict(path, reader="restricted")
    assert not marker.exists()


@pytest.mark.slow  # four tool runs, each starting JAX
def test_cli_converts_reports_errors_on_one_line_and_generate_reads_the_result(models_dir, tmp_path):
    def run(tool: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO_ROOT / "tools" / tool), *args], capture_output=True,
                              text=True, cwd=REPO_ROOT, timeout=300)

    def convert_clipgen(*args: str) -> subprocess.CompletedProcess:
        return run("convert_clipgen.py", *args)

    vqgan_ckpt, gpt_ckpt, _ = official_files("single_attention")
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(b"\x80\x02\x8a\x0alegacy torch format")  # torch < 1.6 wrote pickles, not zip archives
    out = tmp_path / "converted"
    for args, error in [
        ((), f"error: {gpt_ckpt}: the GPT is 32 wide; the head count is known only for the released sizes (1024 "
             "wide: 16 heads, 1280 wide: 20 heads): give it (--heads)"),
        (("--heads", "4", "--reader", "restricted", "--vqgan", str(legacy)),
         f"error: {legacy} is not a zip-format torch checkpoint, the only format the restricted reader reads (torch < "
         "1.6 wrote a legacy format, which only the torch reader reads)"),
    ]:
        flags = {"--vqgan": str(vqgan_ckpt), "--gpt": str(gpt_ckpt), "--out": str(out)}
        flags.update(dict(zip(args[::2], args[1::2])))
        failed = convert_clipgen(*[item for pair in flags.items() for item in pair])
        assert (failed.returncode, failed.stderr.strip().splitlines()[-1]) == (1, error), failed.stderr
        assert not out.exists()

    converted = convert_clipgen("--vqgan", str(vqgan_ckpt), "--gpt", str(gpt_ckpt), "--out", str(out), "--heads", "4")
    assert converted.returncode == 0, converted.stderr
    assert json.loads((out / "metadata.json").read_text())["kind"] == "prior" and checkpointing.is_bundle(out / "vqgan")
    generated = run("generate.py", "--prior", str(out), "--clip", str(models_dir / "clip"), "--text", "a red circle",
                    "--num_candidates", "2", "--batch_size", "2", "--out", str(tmp_path / "generated"))
    assert generated.returncode == 0, generated.stderr
    assert "unverified" in generated.stderr and (tmp_path / "generated" / "samples.json").is_file()


def test_inner_dropout_adds_the_attention_and_mlp_dropouts_of_the_official_blocks():
    """With `inner_dropout` the training forward computes attention itself (for the dropout on its probabilities): at
    a rate that drops nothing it equals the deterministic forward; at 0.5 the extra dropouts change the output."""
    from clipgen_jax.models import prior

    fields = dict(vocab_size=16, num_tokens=9, cond_dim=4, width=12, depth=2, num_heads=3, head_bias=True,
                  exact_gelu=True)
    cond_BD = jax.random.normal(jax.random.PRNGKey(1), (2, 4))
    tokens_BL = jax.random.randint(jax.random.PRNGKey(2), (2, 9), 0, 16)
    params = prior.init_params(prior.Prior(**fields), jax.random.PRNGKey(0))

    def forward(deterministic, **switches):
        model = prior.Prior(**fields, **switches)
        return model.apply({"params": params}, cond_BD, tokens_BL, deterministic=deterministic,
                           rngs={"dropout": jax.random.PRNGKey(3)})

    reference = forward(True)
    np.testing.assert_allclose(forward(False, inner_dropout=True, dropout_rate=2.0 ** -18), reference, atol=1e-5)
    residual_only = forward(False, dropout_rate=0.5)
    all_five = forward(False, inner_dropout=True, dropout_rate=0.5)
    assert not np.allclose(all_five, residual_only) and np.all(np.isfinite(all_five))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_fine_tuning_starts_from_the_converted_prior_at_the_official_loss(scan_layers, tmp_path):
    """`init_from` gives the run the converted prior's architecture and weights: with dropout off, the loss of the
    first step on the fixture's batch is the official model's (train_gpt.py's cross entropy) on it."""
    from clipgen_jax import training
    from clipgen_jax.data import precomputed
    from clipgen_jax.models import prior
    from clipgen_jax.training import prior as prior_training

    bundle = convert("multi_attention", tmp_path / "converted")
    _, _, official = official_files("multi_attention")
    config = training.load_config("configs/prior.py:tiny")  # another architecture: width 32, 2 heads, 256 tokens
    config.init_from = str(bundle)
    config.model.update(dropout_rate=0.0, scan_layers=scan_layers)
    steps = prior_training.PriorSteps(config)
    assert (config.model.width, config.model.num_heads, config.model.num_tokens) == (24, 3, 16)
    assert config.model.head_bias and config.model.exact_gelu and config.model.scan_layers == scan_layers

    state = steps.init_state(jax.random.PRNGKey(0))
    state = state.replace(params=steps.initial_params())
    batch = {precomputed.TOKENS: official["gpt_tokens"].astype(np.int16),
             precomputed.IMAGE_EMBEDDING: official["gpt_embedding"]}
    _, metrics = jax.jit(steps.train_step)(state, batch)
    np.testing.assert_allclose(float(metrics["loss"]), float(official["gpt_loss"]), rtol=1e-5)

    wider = prior.from_config({**config.model, "width": 48})
    with pytest.raises(ValueError, match=r"^init_from X does not fit the model: parameter \['blocks(_0)?'\]"
                                         r"\['attention_norm'\]\['bias'\] is \((1, 24|24,)\) there and "
                                         r"\((1, 48|48,)\) in the model; start from a prior of this architecture$"):
        prior_training.check_params_fit(steps.initial_params(),
                                        jax.eval_shape(lambda: prior.init_params(wider, jax.random.PRNGKey(0))),
                                        "init_from X")
