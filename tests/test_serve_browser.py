"""`python tools/serve.py` (the packaged Shapes prior) driven in a real headless Chromium through selenium and Debian's
chromium-driver: type a prompt or upload an image, click, wait for the gallery, check the kept images are PNGs of
the prior's size, and that the page loaded nothing from another host. Screenshots go to $CLIPGEN_TEST_ARTIFACTS
(default: pytest's temporary directory). Skipped without a browser only when the CI variable is unset."""

import io
import os
import pathlib
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import urllib.request

import numpy as np
import pytest
from PIL import Image

from clipgen_jax import checkpointing, packaged

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"  # Debian's; nothing is downloaded
PROMPT = "a large green triangle in the center on a white background"
KEEP = 4

try:
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:
    webdriver = None

if not os.environ.get("CI") and (webdriver is None or not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER))):
    pytest.skip("needs selenium (pip install -e '.[app,test]') and Debian's chromium and chromium-driver "
                "(apt-get install chromium chromium-driver)", allow_module_level=True)

pytestmark = pytest.mark.slow  # starts the server (loading and warm-up) and a browser


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server_url():
    """The URL of `python tools/serve.py --port PORT` once it has printed "ready"."""
    port = _free_port()
    process = subprocess.Popen([sys.executable, "tools/serve.py", f"--port={port}"], cwd=REPO_ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines, ready = [], threading.Event()

    def read():  # sets `ready` at the ready line, or when the server exits
        for line in process.stdout:
            lines.append(line)
            if line.startswith("ready: "):
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(600) and process.poll() is None, "".join(lines)[-3000:]
        url = next(line for line in lines if line.startswith("ready: ")).split()[1]
        assert url == f"http://127.0.0.1:{port}/"  # loopback by default
        yield url
    finally:
        process.terminate()
        process.wait(60)


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1280"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> pathlib.Path:
    directory = pathlib.Path(os.environ.get("CLIPGEN_TEST_ARTIFACTS") or tmp_path_factory.mktemp("artifacts"))
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _image_size() -> int:
    prior = packaged.path(packaged.PRIORS["shapes"])
    vqgan = prior / checkpointing.load_bundle_metadata(prior)["vqgan_relative"]
    return checkpointing.load_bundle_metadata(vqgan)["model"]["resolution"]


def _set_number(driver, elem_id: str, value: int) -> None:
    field = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=number]")
    field.clear()
    field.send_keys(str(value))
    field.send_keys("\t")


def _generate_and_check(driver, url: str, button_id: str, screenshot: pathlib.Path) -> None:
    """Clicks the button, waits for KEEP images in the gallery, checks each is a PNG of the prior's size."""
    _set_number(driver, "keep", KEEP)
    driver.find_element(By.ID, button_id).click()
    images = WebDriverWait(driver, 300).until(
        lambda d: (found := d.find_elements(By.CSS_SELECTOR, "#gallery .thumbnail-item img")) and
        len(found) == KEEP and found)
    WebDriverWait(driver, 60).until(
        expected_conditions.text_to_be_present_in_element_value((By.CSS_SELECTOR, "#command textarea"),
                                                                "tools/generate.py"))
    size = _image_size()
    for image in images:
        src = image.get_attribute("src")
        assert src.startswith(url), src
        data = urllib.request.urlopen(src, timeout=30).read()
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        assert np.asarray(Image.open(io.BytesIO(data))).shape == (size, size, 3)
    driver.save_screenshot(str(screenshot))
    loaded = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(name.startswith((url, "data:", "blob:")) for name in loaded), loaded


def test_a_prompt_in_the_browser(server_url, browser, artifacts):
    browser.get(server_url)
    prompt = WebDriverWait(browser, 60).until(
        expected_conditions.element_to_be_clickable((By.CSS_SELECTOR, "#prompt textarea")))
    prompt.send_keys(PROMPT)
    _generate_and_check(browser, server_url, "generate", artifacts / "serve_prompt.png")
    command = browser.find_element(By.CSS_SELECTOR, "#command textarea").get_attribute("value")
    assert f"--text={PROMPT}" in shlex.split(command)


def test_variations_of_an_uploaded_image_in_the_browser(server_url, browser, artifacts, tmp_path):
    from clipgen_jax.data import shapes

    upload = tmp_path / "upload.png"
    Image.fromarray(shapes.render_at(shapes.heldout_combinations()[5], 64, (32.0, 32.0))).save(upload)
    browser.get(server_url)
    WebDriverWait(browser, 60).until(
        expected_conditions.element_to_be_clickable((By.XPATH, "//button[@role='tab'][contains(., 'Image')]"))).click()
    browser.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(upload))
    WebDriverWait(browser, 60).until(  # the uploaded file's download link (its name's text is split over elements)
        lambda d: d.find_elements(By.CSS_SELECTOR, "#image a[download='upload.png']"))
    _generate_and_check(browser, server_url, "generate_variations", artifacts / "serve_variations.png")
