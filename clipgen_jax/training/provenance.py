"""What a workdir was made from: the resolved config, the code's git commit, package versions, seeds, devices."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import pathlib
import platform
import subprocess
import sys

import jax

_PACKAGES = ("clipgen_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "ml_collections",
             "tensorflow-datasets", "grain", "array_record", "transformers", "numpy", "Pillow")


def git_commit() -> str | None:
    """The commit of the source tree, with '-dirty' when it has uncommitted changes; None outside git."""
    source_dir = pathlib.Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source_dir, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=source_dir,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def record(workdir: str | pathlib.Path, config_dict: dict) -> pathlib.Path:
    """Writes `config.json` (latest resolved config) and one `provenance/<UTC time>.json` per start or resume."""
    workdir = pathlib.Path(workdir)
    now = datetime.datetime.now(datetime.timezone.utc)
    info = {
        "time_utc": now.isoformat(),
        "argv": sys.argv,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "host": platform.node(),
        "packages": package_versions(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "process_count": jax.process_count(),
        "seed": config_dict.get("seed"),
        "config": config_dict,
    }
    (workdir / "provenance").mkdir(parents=True, exist_ok=True)
    path = workdir / "provenance" / f"{now.strftime('%Y%m%dT%H%M%S.%fZ')}.json"
    path.write_text(json.dumps(info, indent=2, default=str))
    (workdir / "config.json").write_text(json.dumps(config_dict, indent=2, default=str))
    return path
