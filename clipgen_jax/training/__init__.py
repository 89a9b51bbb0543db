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


# In the workdir: held by the process training it (see clipgen_jax.locking).
LOCK_FILE = ".lock"


def train(config: ml_collections.ConfigDict, workdir: str):
    """Runs the trainer that `config.stage` names, holding the workdir's lock for the whole run (export included);
    raises `locking.LockedError` when another process is training in `workdir`."""
    import pathlib

    import jax

    from clipgen_jax import locking
    from clipgen_jax.training import loop

    stage = config.get("stage")
    if stage not in TRAINERS:
        raise ValueError(f"config.stage={stage!r} is not a known stage; use one of {sorted(TRAINERS)}")
    loop.check_train_config(config.train)
    lock_file = locking.lock_path(pathlib.Path(workdir).absolute() / LOCK_FILE, jax.process_index())
    # What taking the lock makes (the lock file, the workdir and its missing parents; deepest first) is removed again
    # when the run fails, the directories only while empty: the stages and the loop check the rest of the config
    # before they write, so a refused config leaves nothing behind.
    made = [path for path in (lock_file, *lock_file.parents) if not path.exists()]
    with locking.exclusive(lock_file, f"training workdir {workdir}",
                           "wait for that run to finish (or stop it), or choose another --workdir"):
        try:
            return importlib.import_module(TRAINERS[stage]).train(config, workdir)
        except BaseException:
            _remove_unused(made)
            raise


def _remove_unused(made: list) -> None:
    """Removes the lock file and then each directory made for it, up to the first that is not empty (one the run
    wrote into). Still under the lock: locking.exclusive makes a process that waited on the removed file retry."""
    try:
        for path in made:
            if path.is_dir():
                path.rmdir()
            else:
                path.unlink()
    except OSError:
        pass


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
