"""The playground page of `diffgentor serve`, in a real headless Chromium (the OS's, driven by Playwright): upload an
image, submit, watch the think/recaption text stream in and the image appear; a corrupt upload shows the server's
error message; ``--no-playground`` turns the page off."""

from __future__ import annotations

import importlib.util
import io
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from .conftest import cli_env, free_port, stop_process

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not CHROMIUM.is_file(), reason="Chromium is not installed at /usr/bin/chromium "
                                 "(apt-get install chromium; .ci/run does)"),
              pytest.mark.skipif(importlib.util.find_spec("playwright") is None,
                                 reason="playwright is not installed (pip install -e '.[integration]')")]

API_KEY = "sk-playground"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _start(tiny: Path, tmp: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = tmp / f"server-{port}.log"
    cmd = [sys.executable, "-m", "diffgentor.server.cli", "serve", str(tiny), "--port", str(port), "--api-key",
           API_KEY, "--device", "cpu", "--dtype", "float32", "--num-kv-blocks", "1024", "--log-level", "warning",
           *extra]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=cli_env(PYTHONUNBUFFERED="1"))
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, log.read_text()[-4000:]
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.3)


@pytest.fixture(scope="module")
def server(tiny_distil, tmp_path_factory):
    proc, base = _start(tiny_distil, tmp_path_factory.mktemp("playground"))
    try:
        yield base
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def _png(path: Path) -> Path:
    img = Image.new("RGB", (96, 64), (30, 120, 200))
    for x in range(20, 60):
        for y in range(16, 48):
            img.putpixel((x, y), (230, 60, 40))
    img.save(path)
    return path


def test_edit_streams_text_then_image(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1180, "height": 820})
    external: list[str] = []
    page.on("request", lambda r: None if r.url.startswith((server, "data:", "blob:")) else external.append(r.url))
    console_errors: list[str] = []
    # script errors only: the model list answers 401 until the key is typed, which the browser logs as well
    page.on("pageerror", lambda e: console_errors.append(str(e)))
    page.goto(server + "/")
    assert page.title() == "diffgentor playground"
    page.set_input_files("#images", str(_png(tmp_path / "cube.png")))
    page.fill("#prompt", "make the red box purple")
    page.fill("#size", "256x256")
    page.fill("#steps", "2")
    page.fill("#seed", "7")
    page.fill("#key", API_KEY)
    page.click("#submit")
    page.wait_for_selector("#result:not([hidden])", timeout=600_000)

    text = page.inner_text("#text")
    assert "<think>" in text or "<recaption>" in text, text
    events = page.eval_on_selector_all("#events li", "els => els.map(e => e.textContent)")
    deltas = [i for i, e in enumerate(events) if e == "image_edit.text_delta"]
    done = events.index("image_edit.completed")
    assert len(deltas) >= 2 and max(deltas) < done, events  # the text arrived piece by piece, before the image
    assert events[-1] == "[DONE]"
    assert "image_edit.partial_image" in events[:done]  # the page asks for one preview
    assert page.locator("#previews img").count() == 1
    src = page.get_attribute("#result", "src")
    assert src.startswith("data:image/png;base64,")
    size = page.evaluate("() => [document.getElementById('result').naturalWidth, "
                         "document.getElementById('result').naturalHeight]")
    assert size == [256, 256]
    assert page.is_hidden("#error")
    assert "Done: 256x256" in page.inner_text("#status")
    assert page.inner_text("#model") == "tiny-HunyuanImage-3.0-Instruct-Distil"
    shot = tmp_path / "playground.png"
    page.screenshot(path=str(shot), full_page=True)
    with Image.open(shot) as im:
        assert im.size[0] >= 1000
    assert not external, external
    assert not console_errors, console_errors


def test_corrupt_upload_shows_the_server_error(server, browser, tmp_path):
    bad = b"\x89PNG\r\n\x1a\n this is not really a PNG"
    expected = httpx.post(server + "/v1/images/edits", headers={"Authorization": f"Bearer {API_KEY}"},
                          files={"image": ("broken.png", io.BytesIO(bad), "image/png")},
                          data={"prompt": "x"}).json()["error"]["message"]
    page = browser.new_page()
    page.goto(server + "/")
    page.set_input_files("#images", files=[{"name": "broken.png", "mimeType": "image/png", "buffer": bad}])
    page.fill("#prompt", "make it snowy")
    page.fill("#key", API_KEY)
    page.click("#submit")
    page.wait_for_selector("#error:not([hidden])", timeout=60_000)
    assert page.inner_text("#error") == expected
    assert page.is_hidden("#result")

    page.fill("#key", "wrong")  # an auth failure shows the server's message as well
    page.click("#submit")
    page.wait_for_function("() => document.getElementById('error').textContent.includes('API key')", timeout=60_000)


def test_no_playground_flag(tiny_distil, tmp_path):
    proc, base = _start(tiny_distil, tmp_path, "--no-playground")
    try:
        r = httpx.get(base + "/")
    finally:
        stop_process(proc)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_page_is_package_data():
    from diffgentor.server.http.playground import page_html

    html = page_html()
    assert "<script>" in html and "/v1/images/edits" in html and "/v1/images/generations" in html
    for external in ("http://", "https://", "//cdn", "src=\"http"):
        assert external not in html, external
