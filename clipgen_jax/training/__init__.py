"""Trainers: one module per stage, each with `train(config, workdir)`, on the shared loop in `loop.py`."""

import importlib

import ml_collections

# Stage name (config.stage) -> module; imported on demand so that a stage's dependencies load only when it runs.
TRAINERS = {
    "autoencoder": "clipgen_jax.training.autoencoder",
    "vqgan": "clipgen_jax.training.vqgan",
    "clip": "clipgen_jax.training.clip",
    "prior": "clipgen_jax.training.prior",
}


def train(config: ml_collections.ConfigDict, workdir: str):
    """Runs the trainer that `config.stage` names."""
    stage = config.get("stage")
    if stage not in TRAINERS:
        raise ValueError(f"config.stage={stage!r} is not a known stage; use one of {sorted(TRAINERS)}")
    return importlib.import_module(TRAINERS[stage]).train(config, workdir)


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads `path/to/config.py[:preset]` as `--config` does; a relative path is tried from the cwd, then the repo."""
    import importlib.util
    import pathlib

    path, _, preset = spec.partition(":")
    candidates = [pathlib.Path(path), pathlib.Path(__file__).resolve().parents[2] / path]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise FileNotFoundError(f"config file {path!r} not found (looked in the cwd and the repository root)")
    module_spec = importlib.util.spec_from_file_location(f"clipgen_config_{found.stem}", found)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(preset) if preset else module.get_config()
