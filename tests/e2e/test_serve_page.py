"""The web page in headless Chromium (Debian's ``chromium``, driven by Playwright): pick a photo, type an
instruction, submit, and the overlay and answer appear; a bad upload shows the server's error and the page
keeps working. The server is the real one (uvicorn on 127.0.0.1, real predictor, tiny random lisa-mobile
unless ``REASONSEG_E2E_MODEL`` names another preset or directory).

Set ``REASONSEG_SCREENSHOT=docs/demo_screenshot.png`` to save the screenshot there.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
EXAMPLE = Path(__file__).resolve().parents[2] / "src/reasonseg/serving/static/examples/chelsea.jpg"
LAUNCH_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    uvicorn = pytest.importorskip("uvicorn")
    from reasonseg.inference.predictor import ReasonSegPredictor
    from reasonseg.serving.app import create_app
    from reasonseg.serving.loading import load_model
    from reasonseg.serving.settings import ServeSettings

    spec = os.environ.get("REASONSEG_E2E_MODEL", "lisa-mobile")
    loaded = load_model(spec, tiny="REASONSEG_E2E_MODEL" not in os.environ, progress=False)
    settings = ServeSettings(port=_free_port(), max_wait_ms=5)
    app = create_app(
        lambda: ReasonSegPredictor(loaded.model, max_new_tokens=24), settings, model_name=loaded.name
    )
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{settings.port}"
    srv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def page() -> Iterator[object]:
    if not Path(CHROMIUM).is_file():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    profile = tempfile.mkdtemp(prefix="reasonseg-chromium-")
    with sync_api.sync_playwright() as pw:
        # A fresh profile directory each run (Playwright's way to pass --user-data-dir).
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=LAUNCH_FLAGS,
            viewport={"width": 1280, "height": 900},
        )  # fmt: skip
        try:
            pg = context.new_page()
            pg.set_default_timeout(120_000)
            yield pg
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


def test_upload_submit_and_overlay_appears(page, server: str) -> None:  # type: ignore[no-untyped-def]
    console_errors: list[str] = []
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    page.goto(server + "/")
    page.wait_for_selector("#examples button")  # examples preloaded from /v1/examples
    assert page.locator("#examples button").count() >= 3
    assert page.locator("#submit").is_disabled()

    page.set_input_files("#file", str(EXAMPLE))
    page.wait_for_selector("#preview", state="visible")
    page.fill("#instruction", "Which animal likes to chase mice? Please respond with segmentation mask.")
    page.click("#submit")
    page.wait_for_selector("#overlay", state="visible")

    src = page.get_attribute("#overlay", "src") or ""
    assert src.startswith("data:image/png;base64,") and len(src) > 1000
    size = page.evaluate("() => [document.querySelector('#overlay').naturalWidth, "
                         "document.querySelector('#overlay').naturalHeight]")  # fmt: skip
    assert size == [451, 300]  # the overlay has the photo's size (chelsea.jpg)
    assert page.locator("#chat li").count() >= 2  # "you: ...", "model: ..." (and a note when no mask)
    assert "total" in page.inner_text("#timings")
    assert page.locator("#error").is_hidden()
    shot = os.environ.get("REASONSEG_SCREENSHOT")
    if shot:
        Path(shot).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=shot, full_page=True)
    assert not console_errors, console_errors


def test_example_click_then_bad_upload_shows_error_and_page_recovers(
    server: str, page, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    page.goto(server + "/")
    page.wait_for_selector("#examples button")
    page.locator("#examples button").first.click()
    page.wait_for_function("() => document.querySelector('#instruction').value.length > 0")
    page.click("#submit")
    page.wait_for_selector("#overlay", state="visible")

    bad = tmp_path / "not-an-image.png"
    bad.write_bytes(b"this is text, not a PNG" * 20)
    page.set_input_files("#file", str(bad))
    page.fill("#instruction", "anything")
    page.click("#submit")
    page.wait_for_selector("#error", state="visible")
    assert "invalid_image" in page.inner_text("#error")

    page.set_input_files("#file", str(EXAMPLE))
    page.fill("#instruction", "and now?")
    page.click("#submit")
    page.wait_for_selector("#overlay", state="visible")
    assert page.locator("#error").is_hidden()
