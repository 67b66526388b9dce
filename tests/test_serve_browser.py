"""The web page in a real browser: headless Chromium types queries, drops and pastes images, clicks and walks the
results with the keyboard, and goes back and forward through the address bar, against the real server (uvicorn in a
thread) over two collections: 40 photos with metadata columns and a caption bank, and caption-only notes.
"""

from __future__ import annotations

import base64
import colorsys
import json
import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from test_serve_helpers import COLOURS, collection, png_bytes, serving  # noqa: F401 (collection is a fixture)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]  # fmt: skip
VIEWPORT = {"width": 1000, "height": 760}


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


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module (each test opens its own context)."""
    _require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


PHOTOS = 40
NOTES = ["a note about the sea", "a note about a red car", "a note about green fields", "a note about the night",
         "a note about sunflowers", "a note about snow"]  # fmt: skip
MARKUP = '<img src=x onerror="document.title=\'pwned\'"> a caption with markup'


@dataclass
class Site:
    """The running server: its address, the keys of its photos and which of them the safety filter hides."""

    url: str
    files: dict  # photo key -> PNG bytes
    unsafe: set


def _photos(folder: Path) -> tuple[list[dict], dict]:
    """40 one-colour photos round the hue circle, with an aesthetic score and a source column."""
    records, files = [], {}
    for i in range(PHOTOS):
        colour = tuple(round(255 * c) for c in colorsys.hsv_to_rgb(i / PHOTOS, 0.4 + 0.6 * (i % 3) / 2, 0.9))
        key = f"p{i:02d}"
        files[key] = png_bytes(colour, (40 + 4 * (i % 5), 40))
        (folder / f"{key}.png").write_bytes(files[key])
        records.append({"key": key, "path": str(folder / f"{key}.png"), "caption": f"photo number {i}",
                        "aesthetic": round(3.1 + (i % 7) * 0.83, 2), "source": "laion" if i % 2 else "cc12m"})
    records[3]["caption"] = MARKUP
    return records, files


@pytest.fixture(scope="module")
def site(collection, tmp_path_factory):  # noqa: F811
    """The app over "photos" (default; the helpers' caption bank) and caption-only "notes", with a safety filter
    whose threshold hides about half the photos, served by uvicorn on a free loopback port in a thread."""
    from PIL import Image

    from clipworks.search.index import build_index
    from clipworks.search.store import write_embeddings
    from clipworks.serve.app import create_app
    from clipworks.serve.limits import ServeSettings
    from clipworks.serve.safety import SafetyConcepts, SafetyFilter
    from clipworks.serve.service import Collection, Encoder

    root = tmp_path_factory.mktemp("browser")
    (root / "photos").mkdir()
    c = collection
    encoder = Encoder(c.model, c.preprocess, c.tokenizer)
    records, files = _photos(root / "photos")
    vectors = encoder.image([Image.open(root / "photos" / f"{r['key']}.png").convert("RGB") for r in records])
    write_embeddings(root / "photos-emb", vectors, records, model="tiny", roots=[str(root / "photos")])
    photos = build_index(root / "photos-emb", root / "photos-index", kind="flat")
    notes = [{"key": f"n{i}", "caption": text} for i, text in enumerate(NOTES)]
    write_embeddings(root / "notes-emb", encoder.text(NOTES), notes, model="tiny")
    notes_index = build_index(root / "notes-emb", root / "notes-index", kind="flat")
    concepts = SafetyConcepts(unsafe=("red",), neutral=("blue", "green"))
    probabilities = SafetyFilter(concepts).probabilities(encoder, photos_vectors(photos, records))
    threshold = float(sorted(probabilities)[PHOTOS // 2])
    unsafe = {r["key"] for r, p in zip(records, probabilities) if p >= threshold}
    safety = SafetyFilter(SafetyConcepts(concepts.unsafe, concepts.neutral, threshold))
    app = create_app(collections=[Collection("photos", photos, c.model, c.preprocess, c.tokenizer, c.captions),
                                  Collection("notes", notes_index, c.model, c.preprocess, c.tokenizer)],
                     settings=ServeSettings(allow_urls=True), safety=safety)  # fmt: skip
    with serving(app) as url:
        yield Site(url, files, unsafe)


def photos_vectors(index, records):
    """The stored (N, D) vectors of the records, as the safety filter sees them."""
    import numpy as np

    return np.stack([index.vector(r["key"]) for r in records])


def _api(site: Site, path: str, fields: dict) -> dict:
    """What the API answers: JSON for /api/search/text, form fields for the image searches."""
    if path.endswith("/text"):
        data, kind = json.dumps(fields).encode(), "application/json"
    else:
        data, kind = urllib.parse.urlencode(fields).encode(), "application/x-www-form-urlencoded"
    request = urllib.request.Request(site.url + path, data=data, headers={"Content-Type": kind})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _save_screenshot(page, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 1000
    extra = os.environ.get("CLIPWORKS_SCREENSHOT_DIR")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(extra) / path.name)


class Watcher:
    """What a page did wrong: script errors, console errors (a CSP refusal among them), requests off its origin,
    and answers of 4xx/5xx."""

    def __init__(self, page, origin: str) -> None:
        self.errors: list[str] = []
        self.foreign: list[str] = []
        self.failed: list[tuple[int, str]] = []
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        own = (origin, "blob:", "data:")
        page.on("request", lambda r: None if r.url.startswith(own) else self.foreign.append(r.url))
        page.on("response", lambda r: self.failed.append((r.status, urlsplit(r.url).path)) if r.status >= 400 else None)

    def check(self, refused: tuple[tuple[int, str], ...] = ()) -> None:
        """No errors, and no failed answers but the `refused` (status, path) ones the test asked for."""
        errors = [e for e in self.errors if not e.startswith("Failed to load resource")]  # those are in `failed`
        assert not errors, errors
        assert not self.foreign, self.foreign
        assert set(self.failed) <= set(refused), self.failed


def _open(browser, site: Site, path: str = "/"):
    page = browser.new_page(viewport=VIEWPORT)
    watcher = Watcher(page, site.url)
    page.goto(site.url + path)
    page.wait_for_function("() => document.getElementById('status').textContent.includes('images')")
    return page, watcher


def _keys(page) -> list[str]:
    return page.eval_on_selector_all("#results li.result", "items => items.map(i => i.dataset.key)")


def _scores(page) -> list[str]:
    return page.locator("#results li.result .score").all_inner_texts()


def _params(page) -> dict:
    return {k: v[0] for k, v in parse_qs(urlsplit(page.url).query).items()}


def _images_loaded(page) -> None:
    page.wait_for_function(
        "() => [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")


def _settled(page) -> None:
    """Waits for the answer to the search under way (its buttons are disabled and old results dimmed meanwhile)."""
    page.wait_for_function("() => !document.getElementById('search').disabled && "
                           "!document.getElementById('results').classList.contains('stale')")


DROP = """([name, b64, kind]) => {
  const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
  const data = new DataTransfer();
  data.items.add(new File([bytes], name, {type: "image/png"}));
  const target = document.querySelector("#results") || document.body;
  const init = {dataTransfer: data, bubbles: true, cancelable: true};
  target.dispatchEvent(new DragEvent("dragenter", init));
  target.dispatchEvent(new DragEvent("dragover", init));
  if (kind === "drop") target.dispatchEvent(new DragEvent("drop", init));
}"""  # fmt: skip
CLIPBOARD = """async (b64) => {
  const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
  await navigator.clipboard.write([new ClipboardItem({"image/png": new Blob([bytes], {type: "image/png"})})]);
}"""


def _expected_cards(result: dict) -> tuple[str, str]:
    return result["key"], f"{result['score']:.3f}"


def test_text_search_more_click_and_history(browser, site, tmp_path):
    from playwright.sync_api import expect

    page, watcher = _open(browser, site)
    assert page.is_visible("#collection-field") and page.input_value("#collection") == "photos"
    assert page.is_visible("#safe-field") and page.is_checked("#safe") and page.is_visible("#url-field")
    page.fill("#k", "8")
    page.fill("#query", "a red photo")
    page.press("#query", "Enter")
    expect(page.locator("#message")).to_have_text("8 results for “a red photo”")
    first = _api(site, "/api/search/text", {"query": "a red photo", "k": 8, "collection": "photos"})["results"]
    assert list(zip(_keys(page), _scores(page))) == [_expected_cards(r) for r in first]
    assert not set(_keys(page)) & site.unsafe  # safe search is on by default
    card = page.locator("#results li.result").first
    assert card.locator(".aesthetic").inner_text() == f"aesthetic {first[0]['aesthetic']:.2f}"
    assert card.locator(".field").first.inner_text() == f"source: {first[0]['metadata']['source']}"
    assert card.locator("a.full").get_attribute("href") == first[0]["full_image"]
    assert _params(page) == {"q": "a red photo", "collection": "photos", "k": "8"}
    _images_loaded(page)
    _save_screenshot(page, tmp_path / "serve_text_search.png")

    everything = _api(site, "/api/search/text", {"query": "a red photo", "k": 100})["results"]
    for _ in range(5):  # "load more" appends the next pages until the ranking ends, and then hides
        page.click("#more")
        _settled(page)
        if page.is_hidden("#more"):
            break
    assert list(zip(_keys(page), _scores(page))) == [_expected_cards(r) for r in everything]
    assert len(everything) == PHOTOS - len(site.unsafe) and len(set(_keys(page))) == len(everything)
    assert MARKUP in page.locator('li[data-key="p03"] .caption').all_inner_texts() or "p03" in site.unsafe
    assert page.title() == "clipworks search"  # the caption with markup stayed text

    length = page.evaluate("history.length")
    key = _keys(page)[2]
    page.locator(f'li[data-key="{key}"] img').click()  # a result: images like it, and no old text in the box
    expect(page.locator("#chip-label")).to_have_text("like " + key)
    similar = _api(site, "/api/search/image", {"key": key, "k": 8, "collection": "photos"})["results"]
    assert list(zip(_keys(page), _scores(page))) == [_expected_cards(r) for r in similar]
    assert _keys(page)[0] == key and _scores(page)[0] == "1.000"
    assert page.input_value("#query") == "" and _params(page)["key"] == key
    page.wait_for_function("() => document.getElementById('preview').naturalWidth > 0")
    _images_loaded(page)
    _save_screenshot(page, tmp_path / "serve_similar.png")

    page.go_back()  # the text query again, from the address bar, with no new history entry
    expect(page.locator("#query")).to_have_value("a red photo")
    _settled(page)
    assert _keys(page) == [r["key"] for r in first]
    assert page.is_hidden("#query-chip") and page.input_value("#k") == "8"
    page.go_forward()
    expect(page.locator("#chip-label")).to_have_text("like " + key)
    _settled(page)
    assert _keys(page) == [r["key"] for r in similar]
    assert page.evaluate("history.length") == length + 1
    watcher.check()
    page.close()


def test_shared_address_filters_collections_and_errors(browser, site, tmp_path):
    from playwright.sync_api import expect

    page, watcher = _open(browser, site, "/?q=a+photo&filter=aesthetic%3E%3D5%3Bsource%3Dlaion&safe=0&k=30")
    expect(page.locator("#message")).to_contain_text("results for “a photo”")  # opening the address runs it
    asked = {"query": "a photo", "k": 30, "filters": "aesthetic>=5;source=laion", "safe": False}
    expected = _api(site, "/api/search/text", asked)["results"]
    assert list(zip(_keys(page), _scores(page))) == [_expected_cards(r) for r in expected]
    assert page.input_value("#filter") == "aesthetic>=5;source=laion" and not page.is_checked("#safe")
    assert page.is_hidden("#more")  # every match fits on one page
    assert all(r["aesthetic"] >= 5 and r["metadata"]["source"] == "laion" for r in expected)
    assert set(_keys(page)) & site.unsafe  # safe search off shows what the filter would hide

    page.check("#safe")  # changing an option runs the query again
    page.wait_for_function("() => !new URLSearchParams(location.search).has('safe')")
    _settled(page)
    safe = _api(site, "/api/search/text", {**asked, "safe": True})["results"]
    assert _keys(page) == [r["key"] for r in safe] and not set(_keys(page)) & site.unsafe

    page.fill("#filter", "colour=red")  # an unknown column: the API's message, on one line
    page.press("#filter", "Enter")
    expect(page.locator("#message.error")).to_contain_text("colour")
    assert page.locator("#results li").count() == 0
    page.fill("#filter", "")
    page.fill("#query", "x" * 1200)
    page.press("#query", "Enter")
    message = page.locator("#message.error")
    expect(message).to_have_text("the query has 1200 characters, more than the limit of 1000")
    assert message.evaluate("m => m.offsetHeight < 2 * parseFloat(getComputedStyle(m).fontSize)")  # one line
    _save_screenshot(page, tmp_path / "serve_error.png")

    page.select_option("#collection", "notes")  # caption-only: text cards; no caption bank to describe with
    page.fill("#query", "a red car")
    page.press("#query", "Enter")
    expect(page.locator("#message")).to_have_text(f"{len(NOTES)} results for “a red car”")
    expected = _api(site, "/api/search/text", {"query": "a red car", "k": 30, "collection": "notes"})["results"]
    assert list(zip(_keys(page), _scores(page))) == [_expected_cards(r) for r in expected]
    assert page.locator("#results li.result.text-only").count() == len(NOTES)
    assert page.locator("#results img").count() == 0 and page.locator("#results a.full").count() == 0
    assert page.locator("#results .caption").all_inner_texts() == [r["caption"] for r in expected]
    assert page.is_hidden("#image-captions") and _params(page)["collection"] == "notes"
    _save_screenshot(page, tmp_path / "serve_caption_cards.png")
    watcher.check(refused=((422, "/api/search/text"),))
    page.close()


def test_drop_paste_url_and_keyboard(browser, site, tmp_path):
    from playwright.sync_api import expect

    page, watcher = _open(browser, site)
    safe_keys = sorted(set(site.files) - site.unsafe)
    dropped, pasted = safe_keys[0], safe_keys[-1]
    page.evaluate(DROP, ["sky.png", base64.b64encode(site.files[dropped]).decode(), "over"])
    assert page.is_visible("#drop-hint")
    _save_screenshot(page, tmp_path / "serve_drop_hint.png")
    page.evaluate(DROP, ["sky.png", base64.b64encode(site.files[dropped]).decode(), "drop"])
    expect(page.locator("#message")).to_have_text("12 results like sky.png")
    assert page.is_hidden("#drop-hint")
    assert _keys(page)[0] == dropped and _scores(page)[0] == "1.000"  # the same pixels as the indexed photo
    assert page.get_attribute("#preview", "src").startswith("blob:")
    width = 40 + 4 * (int(dropped[1:]) % 5)
    page.wait_for_function(f"() => document.getElementById('preview').naturalWidth === {width}")
    _images_loaded(page)
    _save_screenshot(page, tmp_path / "serve_dropped.png")

    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=site.url)
    page.evaluate(CLIPBOARD, base64.b64encode(site.files[pasted]).decode())
    page.click("h1")
    page.keyboard.press("Control+V")  # a real paste of the image on the clipboard
    expect(page.locator("#chip-label")).to_have_text("like image.png")
    page.wait_for_function(f"() => document.querySelector('#results li')?.dataset.key === {json.dumps(pasted)}")
    assert "url" not in _params(page) and "key" not in _params(page)  # an upload has no address...
    page.go_back()  # ...but back and forward still bring each upload's search again (in this tab)
    expect(page.locator("#chip-label")).to_have_text("like sky.png")
    page.wait_for_function(f"() => document.querySelector('#results li')?.dataset.key === {json.dumps(dropped)}")
    page.go_forward()
    expect(page.locator("#chip-label")).to_have_text("like image.png")
    page.wait_for_function(f"() => document.querySelector('#results li')?.dataset.key === {json.dumps(pasted)}")

    page.fill("#url", "http://127.0.0.1:9/cat.png")  # the URL field (allow_urls); the server refuses loopback
    page.press("#url", "Enter")
    expect(page.locator("#message.error")).to_contain_text("loopback")
    assert page.is_visible("#query-chip") and _params(page)["url"] == "http://127.0.0.1:9/cat.png"

    page.goto(site.url + "/?key=" + dropped)  # keyboard: down into the grid, arrows, Tab, Enter, Escape
    expect(page.locator("#message")).to_have_text("12 results like " + dropped)
    page.focus("#query")
    page.keyboard.press("ArrowDown")
    focused = "document.activeElement.dataset.key"
    keys = _keys(page)
    assert page.evaluate(focused) == keys[0]
    page.keyboard.press("ArrowRight")
    assert page.evaluate(focused) == keys[1]
    per_row = page.evaluate("Math.round(document.querySelector('#results').clientWidth / "
                            "document.querySelector('#results li').offsetWidth)")  # fmt: skip
    page.keyboard.press("ArrowDown")
    assert page.evaluate(focused) == keys[1 + per_row]
    page.keyboard.press("Tab")  # Tab reaches the card's full-image link, then the next card
    page.keyboard.press("Tab")
    assert page.evaluate(focused) == keys[2 + per_row]
    page.keyboard.press("Enter")
    expect(page.locator("#chip-label")).to_have_text("like " + keys[2 + per_row])
    page.wait_for_function(f"() => document.activeElement.dataset.key === {json.dumps(keys[2 + per_row])}")
    _images_loaded(page)
    _save_screenshot(page, tmp_path / "serve_keyboard.png")
    page.keyboard.press("Escape")
    expect(page.locator("#results li")).to_have_count(0)
    assert page.is_hidden("#query-chip") and page.input_value("#query") == "" and "key" not in _params(page)
    page.go_back()  # Escape's clearing is a history entry too: back shows the key query again
    expect(page.locator("#chip-label")).to_have_text("like " + keys[2 + per_row])
    watcher.check(refused=((400, "/api/search/image"),))  # the loopback URL
    page.close()


def test_captions_for_an_image(browser, site, tmp_path):
    from playwright.sync_api import expect

    page, watcher = _open(browser, site)
    upload = tmp_path / "query.png"
    upload.write_bytes(png_bytes(COLOURS["yellow"]))
    page.set_input_files("#image", str(upload))
    expect(page.locator("#message")).to_contain_text("like query.png")
    page.click("#image-captions")  # image-to-text over the caption bank: captions, no thumbnails
    expect(page.locator("#message")).to_have_text("6 results describing query.png")
    assert page.locator("#results li.result.text-only .caption").count() == 6
    assert page.locator("#results li.result img").count() == 0
    caption = page.locator("#results .caption").first.inner_text()
    page.locator("#results li.result").first.click()  # a caption runs a text search for it
    expect(page.locator("#query")).to_have_value(caption)
    expect(page.locator("#message")).to_contain_text(f"for “{caption}”")
    page.set_viewport_size({"width": 400, "height": 800})  # a phone's width: the controls wrap, nothing overflows
    assert page.evaluate("document.documentElement.scrollWidth") <= 400
    _images_loaded(page)
    _save_screenshot(page, tmp_path / "serve_narrow.png")
    watcher.check()
    page.close()
