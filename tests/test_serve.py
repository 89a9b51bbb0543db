"""The web app (clipgen_jax/app.py) through gradio_client, on a tiny random prior served on loopback: images in
score order, reproducible and equal to tools/generate.py's; bad requests answered with a message while the server
goes on; a full queue answered "try again"; nothing loaded from another host. tests/test_serve_browser.py drives the
same page in a real Chromium."""

import pathlib
import re
import shlex
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image
from helpers import save_prior_bundle, tiny_models

gradio_client = pytest.importorskip("gradio_client", reason="the app extra: pip install -e '.[app]'")

from clipgen_jax import app, pipeline  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PROMPT = "a small red circle in the top left on a black background"
LIMITS = app.Limits(max_candidates=32, max_prompt_chars=80, queue_size=16)


def controls(**changes) -> list:
    """The controls' values in the endpoints' order: tools/generate.py's defaults with `changes`."""
    return list({**app.DEFAULTS, **changes}.values())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(service, demo, client) of a warmed-up server on 127.0.0.1 serving a tiny random prior."""
    root = tmp_path_factory.mktemp("serve")
    vqgan_path, clip_path = tiny_models(root)
    prior = save_prior_bundle(root / "prior", vqgan_path, clip_path)
    service = app.Service(pipeline.Pipeline.load(prior), LIMITS)
    service.warm_up()
    demo = app.build(service, app.shapes_examples())
    url = app.launch(demo, port=None)
    assert url.startswith("http://127.0.0.1:")
    yield service, demo, gradio_client.Client(url, verbose=False)
    demo.close()


def kept(result) -> tuple[list[np.ndarray], list[float]]:
    """The gallery's images and the scores in their captions."""
    gallery = result[0]
    images = [np.asarray(Image.open(item["image"])) for item in gallery]
    scores = [float(re.fullmatch(r"#\d+: (-?[\d.]+)", item["caption"]).group(1)) for item in gallery]
    return images, scores


@pytest.mark.slow  # tools/generate.py loads and compiles the models again (~40 s)
def test_a_prompt_gives_the_kept_images_best_first_and_tools_generate_makes_the_same(server, tmp_path):
    service, _, client = server
    result = client.predict(PROMPT, *controls(keep=3, seed=5), api_name="/generate")
    images, scores = kept(result)
    assert len(images) == 3 and all(image.shape == (32, 32, 3) for image in images)
    record, command = result[2], result[3]
    assert scores == sorted(scores, reverse=True)
    np.testing.assert_allclose(record["clip_scores"], scores, atol=1e-4)
    assert record["seed"] == 5 and record["num_candidates"] == 16 and record["prompt"] == PROMPT
    grid = np.asarray(Image.open(result[1]))
    assert grid.shape == (32 + 2, 3 * 33 + 1, 3)
    again, _ = kept(client.predict(PROMPT, *controls(keep=3, seed=5), api_name="/generate"))
    for first, second in zip(images, again):
        np.testing.assert_array_equal(first, second)
    other, _ = kept(client.predict(PROMPT, *controls(keep=3, seed=6), api_name="/generate"))
    assert any(not np.array_equal(a, b) for a, b in zip(images, other))
    # The command shown on the page, run as it is, writes the same images with the same scores.
    words = shlex.split(command)
    assert words[:2] == ["python", "tools/generate.py"]
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, *words[1:], f"--out={out}"], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for rank, image in enumerate(images):
        np.testing.assert_array_equal(np.asarray(Image.open(out / pipeline.sample_file_name(0, rank))), image)


def test_variations_of_an_uploaded_image(server, tmp_path):
    _, _, client = server
    upload = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 40, 3), np.uint8)).save(upload)
    result = client.predict(gradio_client.handle_file(str(upload)), *controls(keep=2), api_name="/variations")
    images, scores = kept(result)
    assert len(images) == 2 and scores == sorted(scores, reverse=True)
    assert "--image=YOUR_IMAGE.png" in result[3]


@pytest.mark.parametrize("changes, message", [
    (dict(prompt=""), "the prompt is empty"),
    (dict(prompt="a" * 81), "at most 80"),
    (dict(num_candidates=33), "greater than maximum value 32"),  # the slider's own check
    (dict(keep=5, num_candidates=4), "keep=5"),
    (dict(temperature=5.0), "greater than maximum value 2.0"),
    (dict(guidance_scale=3.0), "condition dropout"),
])
def test_a_bad_request_gets_its_message_and_the_next_one_is_served(server, changes, message):
    _, _, client = server
    prompt = changes.pop("prompt", PROMPT)
    with pytest.raises(gradio_client.exceptions.AppError, match=message):
        client.predict(prompt, *controls(**changes), api_name="/generate")
    images, _ = kept(client.predict(PROMPT, *controls(), api_name="/generate"))
    assert len(images) == 1


def test_an_unreadable_upload_gets_a_message(server, tmp_path):
    _, _, client = server
    upload = tmp_path / "not_an_image.png"
    upload.write_bytes(b"this is text, not a PNG")
    with pytest.raises(gradio_client.exceptions.AppError, match="cannot read the uploaded image"):
        client.predict(gradio_client.handle_file(str(upload)), *controls(), api_name="/variations")
    images, _ = kept(client.predict(PROMPT, *controls(), api_name="/generate"))
    assert len(images) == 1


def test_a_full_queue_says_try_again_and_every_accepted_request_is_answered(server, monkeypatch):
    service, demo, client = server
    release, running = threading.Event(), threading.Event()
    generate_one = service.pipe.generate_one

    def held(*args, **kwargs):  # the first request holds the model until the queue has filled
        running.set()
        assert release.wait(120)
        return generate_one(*args, **kwargs)

    monkeypatch.setattr(service.pipe, "generate_one", held)
    first = client.submit(PROMPT, *controls(), api_name="/generate")
    assert running.wait(60)
    waiting = [client.submit(PROMPT, *controls(seed=seed), api_name="/generate") for seed in range(LIMITS.queue_size)]
    deadline = time.monotonic() + 60
    while len(demo._queue) < LIMITS.queue_size and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(demo._queue) == LIMITS.queue_size
    another_user = gradio_client.Client(demo.local_url, verbose=False)
    with pytest.raises(gradio_client.utils.QueueError, match="Queue is full! Please try again."):
        another_user.predict(PROMPT, *controls(), api_name="/generate")
    release.set()
    for job in [first, *waiting]:
        assert len(job.result(timeout=300)[0]) == 1


def test_the_page_loads_nothing_from_another_host(server):
    _, demo, _ = server
    html = urllib.request.urlopen(demo.local_url, timeout=30).read().decode()
    loaded = re.findall(r"<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)=[\"']([^\"']+)", html)
    assert loaded and all(not re.match(r"(https?:)?//", url) or url.startswith(demo.local_url.rstrip("/"))
                          for url in loaded), loaded
    theme = urllib.request.urlopen(demo.local_url + "theme.css", timeout=30).read().decode()
    assert "@import" not in theme and "fonts.googleapis" not in theme
