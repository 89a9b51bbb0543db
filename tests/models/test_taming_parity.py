"""Importing taming-transformers VQGANs: the converted bundle reproduces taming's own modules (latents, code indices and
decoded images), through both checkpoint readers; the restricted reader refuses code and reads what torch writes.

The parity tests need torch and taming-transformers-rom1504 (the `parity` extra) and are skipped without them.
"""

import pathlib
import pickle
import subprocess
import sys
import types
import zipfile

import jax
import numpy as np
import pytest
import yaml

from clipgen_jax import checkpointing, safe_pickle
from clipgen_jax.models import taming_import

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

# A small taming VQGAN: f4 (32 px -> an 8x8 grid), attention at 8 px. GroupNorm has 32 groups, so every channel
# count is a multiple of 32.
DDCONFIG = dict(double_z=False, z_channels=32, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2],
                num_res_blocks=1, attn_resolutions=[8], dropout=0.0)
N_EMBED = 64
EMBED_DIM = 16
TAMING_YAML = {"model": {
    "base_learning_rate": 4.5e-6,
    "target": "taming.models.vqgan.VQModel",
    "params": {
        "embed_dim": EMBED_DIM, "n_embed": N_EMBED, "monitor": "val/rec_loss", "ddconfig": DDCONFIG,
        "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                       "params": {"disc_conditional": False, "disc_in_channels": 3, "disc_start": 10000,
                                  "disc_weight": 0.8, "codebook_weight": 1.0}}}}}
BATCH = 3
TOLERANCE = 1e-4


def _max_abs_difference(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def taming(torch, tmp_path_factory):
    """taming's Encoder + VectorQuantizer2 + Decoder with random weights, saved as a Lightning-like checkpoint (with
    optimizer state, callback state and the loss's weights beside the state dict) next to its model YAML; plus
    taming's outputs on a batch of random images."""
    model_lib = pytest.importorskip("taming.modules.diffusionmodules.model")
    quantize_lib = pytest.importorskip("taming.modules.vqvae.quantize")
    torch.manual_seed(0)
    modules = torch.nn.ModuleDict({
        "encoder": model_lib.Encoder(**DDCONFIG),
        "decoder": model_lib.Decoder(**DDCONFIG),
        "quantize": quantize_lib.VectorQuantizer2(N_EMBED, EMBED_DIM, beta=0.25),
        "quant_conv": torch.nn.Conv2d(DDCONFIG["z_channels"], EMBED_DIM, 1),
        "post_quant_conv": torch.nn.Conv2d(EMBED_DIM, DDCONFIG["z_channels"], 1),
    }).eval()
    with torch.no_grad():
        # Non-trivial norm params and a codebook on the latents' scale, so that a mis-mapped norm or a wrong nearest
        # code shows in the outputs (taming initialises norms to identity and codes to +-1/K).
        for name, param in modules.named_parameters():
            if "norm" in name:
                param.copy_(torch.rand_like(param) + 0.5 if name.endswith("weight") else 0.1 * torch.randn_like(param))
        images = torch.rand(BATCH, 3, DDCONFIG["resolution"], DDCONFIG["resolution"]) * 2 - 1
        latents = modules["quant_conv"](modules["encoder"](images))
        modules["quantize"].embedding.weight.copy_(latents.std() * torch.randn(N_EMBED, EMBED_DIM))
        quantized, quantizer_loss, (_, _, indices) = modules["quantize"](latents)
        decoded = modules["decoder"](modules["post_quant_conv"](quantized))

    directory = tmp_path_factory.mktemp("taming")
    state_dict = {**modules.state_dict(), "loss.discriminator.main.0.weight": torch.randn(64, 3, 4, 4),
                  "loss.perceptual_loss.lin0.model.1.weight": torch.randn(1, 64, 1, 1)}
    checkpoint = {
        "epoch": 3, "global_step": 1234, "pytorch-lightning_version": "1.0.8", "state_dict": state_dict,
        "optimizer_states": [{"state": {0: {"step": torch.tensor(1234.0), "exp_avg": torch.randn(32, 3, 3, 3)}},
                              "param_groups": [{"lr": 4.5e-6, "betas": (0.5, 0.9), "params": [0]}]}],
        "lr_schedulers": [],
        "callbacks": {"ModelCheckpoint{'monitor': 'val/rec_loss'}": {"best_model_score": torch.tensor(0.25),
                                                                     "best_model_path": "last.ckpt"}},
    }
    ckpt_path, config_path = directory / "last.ckpt", directory / "model.yaml"
    torch.save(checkpoint, ckpt_path)
    config_path.write_text(yaml.safe_dump(TAMING_YAML))
    return types.SimpleNamespace(
        ckpt=ckpt_path, config=config_path, state_dict={k: v.numpy() for k, v in state_dict.items()},
        images_BHWC=images.permute(0, 2, 3, 1).numpy(), latents_BhwD=latents.permute(0, 2, 3, 1).numpy(),
        indices_Bhw=indices.reshape(BATCH, *latents.shape[2:]).numpy(), quantizer_loss=float(quantizer_loss),
        decoded_BHWC=decoded.permute(0, 2, 3, 1).numpy())


@pytest.mark.parametrize("reader", ["torch", "restricted"])
def test_converted_bundle_matches_taming(taming, reader, tmp_path):
    bundle = taming_import.convert(taming.ckpt, taming.config, tmp_path / "bundle", reader=reader)

    model, params, metadata = checkpointing.load_vqgan(bundle)  # the loader every later stage uses
    assert metadata["kind"] == "vqgan"
    assert metadata["source"]["format"] == "taming" and len(metadata["source"]["sha256"]) == 64
    decoded, indices, losses, latents = jax.jit(model.apply)({"params": params}, taming.images_BHWC)

    differences = {"latents": _max_abs_difference(latents, taming.latents_BhwD),
                   "decoded": _max_abs_difference(decoded, taming.decoded_BHWC),
                   "quantizer_loss": abs(float(losses["total"]) - taming.quantizer_loss)}
    print(f"max abs differences ({reader} reader): {differences}")
    assert all(d < TOLERANCE for d in differences.values()), differences
    np.testing.assert_array_equal(indices, taming.indices_Bhw)


def test_model_config_follows_the_yaml(taming):
    assert taming_import.model_config_from_yaml(taming.config) == {
        "ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [8], "z_channels": 32,
        "resolution": 32, "codebook_size": N_EMBED, "code_dim": EMBED_DIM, "quantizer": "vq", "beta": 0.25,
        "legacy_beta": True}


def test_restricted_reader_reads_what_torch_writes(torch, tmp_path):
    """Views into a larger storage, shared storages and every common dtype come back as torch has them."""
    base = torch.randn(4, 5)
    state_dict = {"param": torch.nn.Parameter(torch.randn(2, 3)), "column": base[:, 1], "rows": base[1:3],
                  "transposed": torch.randn(3, 2).t(), "half": torch.randn(3).half(), "long": torch.arange(4),
                  "bool": torch.tensor([True, False]), "bfloat16": torch.randn(3).bfloat16(), "empty": torch.ones(0, 2)}
    path = tmp_path / "tensors.ckpt"
    torch.save({"state_dict": state_dict}, path)

    restricted = taming_import.read_state_dict(path, reader="restricted")
    assert restricted.keys() == state_dict.keys()
    for key, tensor in state_dict.items():
        expected = tensor.detach().float().numpy() if key == "bfloat16" else tensor.detach().numpy()
        assert restricted[key].shape == expected.shape, key
        np.testing.assert_array_equal(np.asarray(restricted[key], expected.dtype), expected, err_msg=key)


def test_old_lightning_checkpoint_is_read_without_running_its_classes(torch, tmp_path, monkeypatch):
    """Lightning < 1.5 keyed a checkpoint's callback states by the callback class (taming's released checkpoints have
    `ModelCheckpoint`), which torch's weights_only loader refuses; the restricted reader admits it as an inert name."""
    module_name = "pytorch_lightning.callbacks.model_checkpoint"
    callback_module = types.ModuleType(module_name)
    callback_class = type("ModelCheckpoint", (), {"__module__": module_name})
    callback_module.ModelCheckpoint = callback_class
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module_name, callback_module)
    weight = torch.randn(2, 3)
    path = tmp_path / "old_lightning.ckpt"
    torch.save({"state_dict": {"w": weight}, "callbacks": {callback_class: {"best_model_score": torch.tensor(1.0)}}},
               path)

    with pytest.raises(pickle.UnpicklingError):
        taming_import.read_state_dict(path, reader="torch")
    for reader in ("restricted", "auto"):
        np.testing.assert_array_equal(taming_import.read_state_dict(path, reader=reader)["w"], weight.numpy())


def test_missing_key_is_reported_by_name(taming):
    state_dict = dict(taming.state_dict)
    del state_dict["decoder.up.1.upsample.conv.weight"]
    model_config = taming_import.model_config_from_yaml(taming.config)
    with pytest.raises(taming_import.TamingImportError, match=r"missing: decoder\.up\.1\.upsample\.conv\.weight"):
        taming_import.params_from_state_dict(state_dict, model_config)


def test_mis_shaped_and_unexpected_keys_are_reported(taming):
    state_dict = {**taming.state_dict, "encoder.conv_in.bias": np.zeros(7, np.float32),
                  "decoder.extra.weight": np.zeros(1, np.float32)}
    model_config = taming_import.model_config_from_yaml(taming.config)
    with pytest.raises(taming_import.TamingImportError,
                       match=r"mis-shaped: encoder\.conv_in\.bias \(7,\) \(expected \(32,\)\); "
                             r"unexpected: decoder\.extra\.weight"):
        taming_import.params_from_state_dict(state_dict, model_config)


@pytest.mark.faults
def test_restricted_reader_refuses_code(tmp_path, malicious_pickle):
    marker = tmp_path / "pwned"
    path = tmp_path / "malicious.ckpt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", malicious_pickle(lambda payload: {"state_dict": payload}, marker))
        archive.writestr("archive/version", "3\n")
    with pytest.raises(safe_pickle.UnsafePickleError, match="system"):
        taming_import.read_state_dict(path, reader="restricted")
    assert not marker.exists()


@pytest.mark.parametrize("change, message", [
    ({"double_z": True}, "double_z is True; only False is supported"),
    ({"out_ch": 1}, "out_ch is 1; only 3 is supported"),
    ({"ch": "wide"}, "ddconfig.ch is 'wide'; expected integers"),
])
def test_unsupported_configs_are_refused(tmp_path, change, message):
    config = {"model": {**TAMING_YAML["model"], "params": {**TAMING_YAML["model"]["params"],
                                                          "ddconfig": {**DDCONFIG, **change}}}}
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(taming_import.TamingImportError, match=message):
        taming_import.model_config_from_yaml(path)


def test_cli_converts_and_reports_errors_on_one_line(taming, tmp_path):
    def convert_taming(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "convert_taming.py"), *args],
                              capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)

    out = tmp_path / "bundle"
    converted = convert_taming("--ckpt", str(taming.ckpt), "--config", str(taming.config), "--out", str(out))
    assert converted.returncode == 0, converted.stderr
    assert checkpointing.is_bundle(out)

    again = convert_taming("--ckpt", str(taming.ckpt), "--config", str(taming.config), "--out", str(out))
    assert again.returncode == 1
    assert again.stderr.strip() == f"error: {out} already exists; choose a new output directory or remove it"
