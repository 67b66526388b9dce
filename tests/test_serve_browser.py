"""The web page in a real browser: headless Chromium types a query and sees result thumbnails with scores."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from test_serve_helpers import COLOURS, collection, make_app, png_bytes  # noqa: F401 (collection is a fixture)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]  # fmt: skip


def _require_browser() -> None:
    missing = [what for what, ok in (("Chromium at " + CHROMIUM, os.path.exists(CHROMIUM)),
                                     ("the playwright package", _has_playwright())) if not ok]  # fmt: skip
    if missing:
        reason = f"the browser test needs {' and '.join(missing)} (Debian: apt install chromium)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


def _has_playwright() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_url(collection):  # noqa: F811
    """The app served by uvicorn on a free loopback port, in a thread."""
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(make_app(collection), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def _save_screenshot(page, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 1000
    extra = os.environ.get("CLIPWORKS_SCREENSHOT_DIR")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(extra) / path.name)


def test_search_page_in_chromium(server_url, tmp_path):
    _require_browser()
    from playwright.sync_api import expect, sync_playwright

    requests = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 760})
            page.on("request", lambda r: requests.append(r.url))
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server_url + "/")
            expect(page.locator("#status")).to_contain_text("images")
            page.fill("#k", "4")
            page.fill("#query", "a red square")
            page.press("#query", "Enter")
            page.wait_for_selector("#results li.result img")
            results = page.locator("#results li.result")
            assert results.count() == 4
            scores = [float(s) for s in results.locator(".score").all_inner_texts()]
            assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)
            page.wait_for_function(  # every thumbnail really loaded from /api/image/...
                "[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")
            assert "4 results" in page.text_content("#message")
            _save_screenshot(page, tmp_path / "serve_text_search.png")

            upload = tmp_path / "query.png"
            upload.write_bytes(png_bytes(COLOURS["yellow"]))
            page.set_input_files("#image", str(upload))
            page.click("#image-search")
            expect(page.locator("#message")).to_contain_text("like query.png")
            assert page.locator("#results li.result").first.get_attribute("data-key") == "yellow"
            page.click("#image-captions")  # image-to-text over the caption bank: captions, no thumbnails
            expect(page.locator("#message")).to_contain_text("describing query.png")
            assert page.locator("#results li.result .caption").count() == 4
            assert page.locator("#results li.result img").count() == 0

            page.fill("#query", "x" * 1200)  # the server refuses it: the page shows the JSON error
            page.press("#query", "Enter")
            expect(page.locator("#message.error")).to_contain_text("more than the limit of 1000")
            assert not errors, errors
        finally:
            browser.close()
    assert all(url.startswith(server_url) for url in requests), [u for u in requests if not u.startswith(server_url)]
