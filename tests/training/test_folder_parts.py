"""The loop and image folders' validation part: which split evaluates, and resuming a workdir that recorded another
`data.validation_fraction` (or none: made before folders had parts, when every image trained)."""

import json

import ml_collections
import pytest

from clipgen_jax.data import images
from clipgen_jax.training import loop


def _folder_config(**data) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(dict(data=images.default_data_config(), train=loop.default_train_config()))
    config.data.update(source="folder", folder="photos", **data)
    return config


def test_a_folder_evaluates_on_its_validation_part_or_without_one_on_its_images():
    assert loop.eval_split(_folder_config()) == "validation"
    assert loop.eval_split(_folder_config(validation_fraction=0.0)) == "train"


def test_resuming_with_another_validation_fraction_is_refused_in_one_line(tmp_path):
    (tmp_path / "checkpoints" / "500").mkdir(parents=True)
    (tmp_path / "config.json").write_text(json.dumps({"data": {"source": "folder", "folder": "photos"}}))
    with pytest.raises(ValueError, match=r"resume it with --config.data.validation_fraction=0.0, or train into a new"):
        loop.check_recorded_folder_part(_folder_config(), tmp_path)
    loop.check_recorded_folder_part(_folder_config(validation_fraction=0.0), tmp_path)  # the recorded behaviour
    (tmp_path / "config.json").write_text(json.dumps({"data": {"source": "folder", "validation_fraction": 0.1}}))
    loop.check_recorded_folder_part(_folder_config(), tmp_path)
    with pytest.raises(ValueError, match="validation_fraction=0.1"):
        loop.check_recorded_folder_part(_folder_config(validation_fraction=0.2), tmp_path)
