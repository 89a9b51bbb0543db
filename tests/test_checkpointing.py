"""Checkpointer: resume from the newest readable checkpoint; never start afresh over checkpoints it cannot read."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipgen_jax import checkpointing


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


@pytest.mark.faults
def test_restores_the_newest_and_refuses_checkpoints_of_another_state(tmp_path):
    state = {"params": {"w": jnp.arange(3.0)}, "step": jnp.asarray(7, jnp.int32)}
    checkpointer = checkpointing.Checkpointer(tmp_path, async_save=False)
    assert checkpointer.restore_latest(_abstract(state)) is None  # no checkpoints: a fresh start
    checkpointer.save(7, state, {"next_index": 3}, force=True)
    checkpointer.wait()
    restored, data_state = checkpointer.restore_latest(_abstract(state))
    np.testing.assert_array_equal(restored["params"]["w"], [0.0, 1.0, 2.0])
    assert data_state == {"next_index": 3}
    other = {"params": {"w": jnp.zeros(3), "extra": jnp.zeros(2)}, "step": jnp.asarray(0, jnp.int32)}
    with pytest.raises(checkpointing.UnrestorableCheckpointsError, match="none of the 1 checkpoints"):
        checkpointer.restore_latest(_abstract(other))
    checkpointer.close()
