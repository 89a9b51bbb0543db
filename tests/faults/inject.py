"""Runs a tool as a user would, with one fault injected: `python tests/faults/inject.py FAULT_JSON TOOL [ARGS...]`.

FAULT_JSON is one of
  {"kill": "step", "step": N, "delay": S}    SIGKILL S seconds after the batch of step N + 1 is requested, i.e. while
                                            step N computes (dispatch is asynchronous) or soon after
  {"kill": "save_started", "step": N}       SIGKILL as soon as the save of step N returns: its files are being written
  {"kill": "save_unhashed", "step": N}      SIGKILL after every file of step N is written, before its manifest
  {"kill": "save_uncommitted", "step": N}   SIGKILL after step N's manifest is written, before Orbax commits it
  {"kill": "call", "target": "module:function", "after": K}
                                            SIGKILL at the function's (K + 1)-th call, before it runs (e.g.
                                            clipgen_jax.precompute:_write_batch: while a shard is being written)
  {"enospc": "module:function", "after": K} the function raises OSError(ENOSPC) from its (K + 1)-th call on
and the tool (e.g. tools/train.py) then runs as `python TOOL ARGS...` would. A kill is SIGKILL to this process, which
has no chance to clean up: what a power cut or the OOM killer leaves.
"""

import errno
import importlib
import json
import os
import pathlib
import runpy
import signal
import sys
import threading

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_during_step(step: int, delay: float) -> None:
    from clipgen_jax import checkpointing
    from clipgen_jax.training import loop

    resumed_at = [0]
    restore_latest = checkpointing.Checkpointer.restore_latest

    def remembering_restore_latest(self, abstract_state):
        restored = restore_latest(self, abstract_state)
        resumed_at[0] = 0 if restored is None else int(restored[0].step)
        return restored

    class KillingIterator:
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def __iter__(self):
            return self

        def __next__(self):
            self.calls += 1
            if resumed_at[0] + self.calls == step + 1:
                threading.Timer(delay, _die).start()
            return next(self.inner)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    # Wraps whatever the stage reads its batches with (images, precomputed tokens and embeddings, ...).
    batch_iterator_factory = loop._batch_iterator_factory

    def killing_batch_iterator_factory(stage):
        make_batch_iterator = batch_iterator_factory(stage)

        def killing_make_batch_iterator(*args, **kwargs):
            iterator = make_batch_iterator(*args, **kwargs)
            return iterator if kwargs.get("num_epochs") == 1 else KillingIterator(iterator)  # not the evaluation batch

        return killing_make_batch_iterator

    checkpointing.Checkpointer.restore_latest = remembering_restore_latest
    loop._batch_iterator_factory = killing_batch_iterator_factory


def _kill_during_save(kind: str, step: int) -> None:
    from clipgen_jax import checkpointing

    if kind == "save_started":
        save = checkpointing.Checkpointer.save

        def killing_save(self, save_step, *args, **kwargs):
            started = save(self, save_step, *args, **kwargs)
            if save_step == step:
                _die()
            return started

        checkpointing.Checkpointer.save = killing_save
        return
    write_manifest = checkpointing.write_manifest

    def killing_write_manifest(directory):
        is_target = int(pathlib.Path(directory).name.split(".")[0]) == step  # "<step>.orbax-checkpoint-tmp"
        if is_target and kind == "save_unhashed":
            _die()
        write_manifest(directory)
        if is_target and kind == "save_uncommitted":
            _die()

    checkpointing.write_manifest = killing_write_manifest


def _at_call(target: str, after: int, fault) -> None:
    """`fault(target)` runs at each call of `target` ("module:function") from its (after + 1)-th on, before it."""
    module_name, name = target.split(":")
    module = importlib.import_module(module_name)
    function = getattr(module, name)
    calls = [0]

    def faulty(*args, **kwargs):
        calls[0] += 1
        if calls[0] > after:
            fault(target)
        return function(*args, **kwargs)

    setattr(module, name, faulty)


def _disk_full(target: str) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"(injected into {target})")


def main() -> None:
    fault = json.loads(sys.argv[1])
    tool, args = sys.argv[2], sys.argv[3:]
    sys.path.insert(0, str(REPO_ROOT))
    if fault.get("kill") == "step":
        _kill_during_step(fault["step"], fault.get("delay", 0.0))
    elif fault.get("kill", "").startswith("save_"):
        _kill_during_save(fault["kill"], fault["step"])
    elif fault.get("kill") == "call":
        _at_call(fault["target"], fault.get("after", 0), lambda target: _die())
    elif "enospc" in fault:
        _at_call(fault["enospc"], fault.get("after", 0), _disk_full)
    else:
        raise SystemExit(f"unknown fault {fault}")
    sys.argv = [tool, *args]
    runpy.run_path(tool, run_name="__main__")


if __name__ == "__main__":
    main()
