"""Untrusted weight files: a pickle whose unpickling would run a shell command (touching a marker file) is refused
with a clear error wherever the project reads pickle-based weights (a taming .ckpt through every reader and the
conversion tool; the LPIPS weights file the VQGAN loss loads), and the marker never appears. A scan of the package
source keeps it that way: no pickle load, torch.load without weights_only, or np.load with allow_pickle outside
clipgen_jax/safe_pickle.py. (tests/models/test_lpips.py and test_taming_parity.py cover the LPIPS converter and the
restricted reader on their own.)"""

import ast
import io
import pathlib
import pickle
import zipfile

import numpy as np
import pytest
import yaml

from clipgen_jax import safe_pickle
from clipgen_jax.models import lpips, taming_import
from faultlib import REPO_ROOT, assert_one_line_error, run_tool

pytestmark = pytest.mark.faults

# A small taming model YAML: the conversion reads it first, then refuses the checkpoint.
TAMING_YAML = {"model": {"target": "taming.models.vqgan.VQModel", "params": {
    "embed_dim": 8, "n_embed": 16, "ddconfig": {
        "double_z": False, "z_channels": 8, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
        "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}}}


@pytest.fixture
def malicious_ckpt(tmp_path, malicious_pickle):
    """A torch zip checkpoint (as torch.save lays it out) whose data.pkl would `touch` the marker: (path, marker)."""
    marker = tmp_path / "pwned"
    path = tmp_path / "last.ckpt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", malicious_pickle(lambda payload: {"state_dict": payload}, marker,
                                                              protocol=2))  # what torch.save writes
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
    return path, marker


@pytest.mark.parametrize("reader", ["auto", "torch"])
def test_taming_checkpoint_with_code_is_refused_by_every_reader(malicious_ckpt, reader):
    if reader == "torch":
        pytest.importorskip("torch")
    path, marker = malicious_ckpt
    with pytest.raises(Exception) as error:
        taming_import.read_state_dict(path, reader=reader)
    # torch's weights_only unpickler refuses it itself; "auto" then tries the restricted reader, which names it.
    expected = safe_pickle.UnsafePickleError if reader == "auto" else pickle.UnpicklingError
    assert isinstance(error.value, expected), repr(error.value)
    assert not marker.exists()


def test_convert_taming_tool_refuses_it_in_one_line(malicious_ckpt, tmp_path):
    path, marker = malicious_ckpt
    config = tmp_path / "model.yaml"
    config.write_text(yaml.safe_dump(TAMING_YAML))
    result = run_tool("tools/convert_taming.py", f"--ckpt={path}", f"--config={config}", f"--out={tmp_path / 'out'}")
    assert_one_line_error(result, r"last.ckpt refers to (posix|os)\.system, which a weights file has no reason to "
                                  r"contain; refusing to load it")
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout", ["pickle", "npz_of_objects"])
def test_lpips_weights_file_holding_a_pickle_is_refused(tmp_path, malicious_pickle, monkeypatch, layout):
    """The VQGAN's perceptual loss loads $CLIPGEN_LPIPS_WEIGHTS: a pickle planted there never runs."""
    marker = tmp_path / "pwned"
    path = tmp_path / "lpips_vgg16.npz"
    if layout == "pickle":
        path.write_bytes(malicious_pickle(lambda payload: {"vgg/conv1_1/kernel": payload}, marker))
    else:  # a real .npz whose one array has dtype object: its data is a pickle, here the malicious one
        buffer = io.BytesIO()
        np.lib.format.write_array_header_1_0(buffer, {"descr": "|O", "fortran_order": False, "shape": (1,)})
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("vgg/conv1_1/kernel.npy",
                             buffer.getvalue() + malicious_pickle(lambda payload: [payload], marker))
    monkeypatch.setenv(lpips.WEIGHTS_ENV_VAR, str(path))
    with pytest.raises(ValueError, match=rf"{path} is not a plain LPIPS weights .npz \(it holds pickled objects, "
                                         rf"which are never loaded\); create the right file with "):
        lpips.load_params()
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------------
# The source scan.

_PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
_PICKLE_LOADERS = {"load", "loads", "Unpickler", "open"}  # shelve.open unpickles


def unsafe_loads(source: str) -> list[str]:
    """`line: what` for each call in `source` that can unpickle untrusted bytes."""
    tree = ast.parse(source)
    modules = {}  # local name -> module, from the imports
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):  # an Unpickler subclass loads whatever its find_class admits
            for base in node.bases:
                if isinstance(base, ast.Attribute) and base.attr == "Unpickler":
                    found.append(f"{node.lineno}: class {node.name}(...Unpickler)")
        if isinstance(node, ast.Import):
            for alias in node.names:
                modules[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(
                    ".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module in _PICKLE_MODULES:
            for alias in node.names:
                if alias.name in _PICKLE_LOADERS:
                    found.append(f"{node.lineno}: from {node.module} import {alias.name}")
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
        module, name = modules.get(owner, owner), node.func.attr
        keywords = {keyword.arg: keyword.value for keyword in node.keywords}

        def is_true(key):
            return isinstance(keywords.get(key), ast.Constant) and keywords[key].value is True

        if module in _PICKLE_MODULES and name in _PICKLE_LOADERS:
            found.append(f"{node.lineno}: {owner}.{name}(")
        elif module == "torch" and name == "load" and not is_true("weights_only"):
            found.append(f"{node.lineno}: torch.load( without weights_only=True")
        elif module == "numpy" and name == "load" and "allow_pickle" in keywords and not (
                isinstance(keywords["allow_pickle"], ast.Constant) and keywords["allow_pickle"].value is False):
            found.append(f"{node.lineno}: numpy.load( with allow_pickle")
        elif name == "read_pickle" or is_true("from_pt"):
            found.append(f"{node.lineno}: {name}( (unpickles)")
    return found


def test_the_scan_finds_what_it_looks_for():
    flagged = ["import pickle\npickle.load(f)", "import pickle as p\np.loads(b)", "from pickle import load",
               "import dill\ndill.loads(b)", "import torch\ntorch.load(path)",
               "import torch\ntorch.load(p, weights_only=False)", "import numpy as np\nnp.load(p, allow_pickle=True)",
               "import pandas as pd\npd.read_pickle(p)", "import shelve\nshelve.open(p)",
               "m = Model.from_pretrained(p, from_pt=True)", "import pickle\nclass U(pickle.Unpickler): pass"]
    for source in flagged:
        assert unsafe_loads(source), source
    safe = ["import torch\ntorch.load(p, weights_only=True, map_location='cpu')", "import numpy as np\nnp.load(p)",
            "import numpy as np\nnp.load(p, allow_pickle=False)", "import pickle\nraise pickle.UnpicklingError('x')",
            "import json\njson.load(f)"]
    for source in safe:
        assert unsafe_loads(source) == [], source


def test_no_unsafe_unpickling_in_the_package_or_tools():
    allowed = {REPO_ROOT / "clipgen_jax" / "safe_pickle.py"}
    files = [path for root in ("clipgen_jax", "tools") for path in sorted((REPO_ROOT / root).rglob("*.py"))]
    assert len(files) > 20
    found = [f"{path.relative_to(REPO_ROOT)}:{finding}" for path in files if path not in allowed
             for finding in unsafe_loads(path.read_text())]
    assert found == [], "unpickling outside clipgen_jax/safe_pickle.py (use safe_pickle.restricted_load):\n" + \
        "\n".join(found)


def test_the_restricted_unpickler_is_the_one_exception():
    """The scan does see the restricted unpickler (the allowed file is allowed, not overlooked)."""
    assert unsafe_loads(pathlib.Path(safe_pickle.__file__).read_text()) != []
