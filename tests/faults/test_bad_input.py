"""Bad configs and command-line input: each is a one-line `error: ...` saying what is wrong and what to do, exit status
1, before anything is loaded or written (a config value that only the stage or the data pipeline can check: after they
load, still before anything is written). test_generate_tool.py covers generate's prompt problems, empty lines in a
prompts file among them; test_precompute.py covers precompute's config checks."""

import pytest

from clipgen_jax import pipeline
from faultlib import assert_one_line_error, run_tool, train_args

pytestmark = pytest.mark.faults

TINY = "configs/autoencoder.py:tiny"


@pytest.mark.parametrize("override, expected", [
    ("--config.train.stepz=3", r"--config.train.stepz: the config has no field 'stepz' \(Did you mean \"steps\" "
                               r"instead of \"stepz\"\?\); check the name against the config file"),
    ("--config.train.steps=ten", r"flag --config.train.steps=ten: invalid literal for int\(\) .*--helpshort"),
], ids=["unknown_field", "wrong_type"])
def test_train_refuses_bad_config_overrides(override, expected, shapes_data_dir, tmp_path):
    result = run_tool("tools/train.py", *train_args(tmp_path / "run", shapes_data_dir, config=TINY), override)
    assert_one_line_error(result, expected)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, expected", [
    ("--config.train.steps=-1", r"train.steps=-1 must be at least 1"),  # checked before the workdir's lock is taken
    ("--config.data.source=nope", r"data.source='nope' is not one of \('shapes', 'tfds', 'folder'\)"),  # after
], ids=["loop_setting", "data_setting"])
def test_train_refuses_a_bad_config_value_and_leaves_no_workdir(override, expected, shapes_data_dir, tmp_path):
    """Not even the lock file, config.json or provenance/: the new workdir (and its new parent) does not exist."""
    result = run_tool("tools/train.py", *train_args(tmp_path / "runs" / "run", shapes_data_dir, config=TINY), override)
    assert_one_line_error(result, expected)
    assert list(tmp_path.iterdir()) == []


def test_a_refused_config_leaves_an_existing_workdir_as_it_was(shapes_data_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("kept")
    result = run_tool("tools/train.py", *train_args(tmp_path, shapes_data_dir, config=TINY),
                      "--config.data.source=nope")
    assert_one_line_error(result, r"data.source='nope' is not one of")
    assert [path.name for path in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("workdir, expected", [
    (None, r"Flag --workdir must have a value other than None"),
    ("", r"--workdir is empty; name the run's directory"),
], ids=["missing", "empty"])
def test_train_refuses_a_missing_workdir(workdir, expected, tmp_path):
    args = [f"--config={TINY}"] + ([] if workdir is None else [f"--workdir={workdir}"])
    result = run_tool("tools/train.py", *args, cwd=tmp_path)
    assert_one_line_error(result, expected)
    assert list(tmp_path.iterdir()) == []  # nothing trained into the current directory


def test_generate_refuses_a_prompts_file_that_is_not_utf8(tmp_path):
    """The prompts file is read before any model loads (so no prior is needed to see the error)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("a red circle\n".encode() + b"a \xff\xfe square\n")
    result = run_tool("tools/generate.py", f"--prompts={prompts}", f"--prior={tmp_path / 'no_prior'}",
                      f"--out={tmp_path / 'out'}")
    assert_one_line_error(result, r"cannot read the prompts file .*prompts.txt: 'utf-8' codec can't decode byte 0xff")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["prompts.txt"]


@pytest.mark.parametrize("flag, expected", [
    ("--top_k=0", r"top_k=0 must be at least 1"),
    ("--top_p=1.5", r"top_p=1.5 must be in \(0, 1\]"),
    ("--temperature=-1", r"temperature=-1.0 must be a number >= 0"),
    ("--guidance_scale=-2", r"guidance_scale=-2.0 must be a number >= 0"),
    ("--keep=3", r"keep=3 must be between 1 and num_candidates=2"),
], ids=["top_k_0", "top_p_1.5", "negative_temperature", "negative_guidance_scale", "keep_above_candidates"])
def test_generate_refuses_absurd_sampling_settings_before_loading_a_model(flag, expected, tmp_path):
    """The prior named does not exist: loading it would fail with another message, so the settings were refused
    first. Nothing is written, neither the output directory nor anything in the current one."""
    result = run_tool("tools/generate.py", "--text=a red circle", f"--prior={tmp_path / 'no_prior'}",
                      f"--out={tmp_path / 'out'}", "--num_candidates=2", flag, cwd=tmp_path)
    assert_one_line_error(result, expected)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def pipe(models_dir, tmp_path_factory):
    from helpers import save_prior_bundle

    bundle = save_prior_bundle(tmp_path_factory.mktemp("prior") / "prior", models_dir / "vqgan", models_dir / "clip")
    return pipeline.Pipeline.load(bundle)


def test_a_top_k_beyond_the_vocabulary_is_refused_before_sampling(pipe):
    """The bound tools/generate.py cannot check before the prior loads; Pipeline.generate checks every setting
    (tools/generate.py prints the ValueError as `error: ...` with exit status 1 and no output)."""
    with pytest.raises(ValueError, match=r"^top_k=65 must be between 1 and the vocabulary size 64$"):
        pipe.generate(["a red circle"], num_candidates=2, seed=0, batch_size=2, top_k=65)
