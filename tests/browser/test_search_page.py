"""The search page in a real headless Chromium (Debian's chromium + chromium-driver through
Selenium), over a real index: the demo's generated images on the local S3 server, embedded
by the real job (resnet10t on a local Ray), served by the aiohttp app on loopback.

It uploads a variant and sees its base among the first results, clicks a result and sees
the grid change, steps back and forward through the searches, sees an error in words, scans
every response the browser received for the store's credentials, and saves a screenshot
in the test's tmp dir (SPARSE_EMBED_UPDATE_SCREENSHOT=1 also copies it to docs/search-page.png,
the README's picture)."""
from __future__ import annotations

import base64
import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
MISSING = [what for what, ok in ((f"{CHROMIUM} (Debian package chromium)", os.path.exists(CHROMIUM)),
                                 (f"{CHROMEDRIVER} (Debian package chromium-driver)", os.path.exists(CHROMEDRIVER)),
                                 ("the selenium package (pip install -e .[test])", importlib.util.find_spec("selenium")))
           if not ok]
if MISSING:
    pytest.skip(f"the browser test needs {', '.join(MISSING)}; .ci/run installs them", allow_module_level=True)

from helpers import SPEC  # noqa: E402
from sparse_embed.infra.synthetic_images import generate  # noqa: E402
from sparse_embed.jobs.demo import corrupt_objects  # noqa: E402
from sparse_embed.pipeline.embed.run import EmbedConfig, run_embed  # noqa: E402
from sparse_embed.pipeline.serve.app import build_app  # noqa: E402
from sparse_embed.pipeline.serve.live_index import LiveIndex  # noqa: E402
from sparse_embed.pipeline.serve.runner import BackgroundServer  # noqa: E402
from sparse_embed.pipeline.store import storage  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "docs" / "search-page.png"
N_BASE = 8  # the demo's generator and seed (jobs/demo.py), fewer images
WAIT_S = 120


@pytest.fixture(scope="module")
def served(object_store, ray_local):
    bucket = object_store.create_bucket("browser")
    source, out = f"{bucket}/images/", f"{bucket}/emb"
    images = generate(N_BASE, seed=0)
    storage.put_many(source, {im.key: im.data for im in images} | corrupt_objects(3))
    run_embed(EmbedConfig(source=source, out=out, spec=SPEC, index_shards=2))
    live = LiveIndex(f"{out}/index")
    live.load()
    with BackgroundServer(build_app(live)) as srv:
        yield {"url": srv.url, "source": source, "images": images}


@pytest.fixture
def browser(tmp_path, monkeypatch):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not download a driver or a browser
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1000", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # the Network.* events, for the credential scan
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Network.enable", {})
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    def check(d):
        error = d.find_element("id", "error")
        if error.is_displayed() and "error" not in what:
            raise AssertionError(f"while waiting for {what}, the page shows: {error.text}")
        return condition(d)

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.2).until(check, message=f"waiting for {what}")


def _cards(driver) -> list[dict]:
    return driver.execute_script(
        "return [...document.querySelectorAll('#grid .card')].map(c => ({id: c.dataset.id, "
        "uri: c.querySelector('.uri').title, score: c.querySelector('.score').textContent}));")


def _grid_query(driver) -> str | None:
    return driver.execute_script("return document.getElementById('grid').dataset.query || null;")


def _thumbs_loaded(driver) -> bool:
    return driver.execute_script(
        "const imgs = [...document.querySelectorAll('#grid img, #query img')];"
        "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);")


def _responses(driver) -> list[dict]:
    """Every response the browser received (performance log), with its body where Chrome kept it."""
    out = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] != "Network.responseReceived":
            continue
        response = msg["params"]["response"]
        item = {"url": response["url"], "status": response["status"], "headers": json.dumps(response.get("headers", {})),
                "body": None}
        try:
            got = driver.execute_cdp_cmd("Network.getResponseBody", {"requestId": msg["params"]["requestId"]})
            item["body"] = base64.b64decode(got["body"]).decode("latin-1") if got.get("base64Encoded") else got["body"]
        except Exception:  # bodies of blob: URLs and evicted resources are not kept
            pass
        out.append(item)
    return out


def test_search_page_in_a_real_browser(served, browser, tmp_path, object_store):
    driver, url, source = browser, served["url"], served["source"]
    seen = []

    driver.get(url)
    _wait(driver, lambda d: "images" in d.find_element("id", "status").text, "the status header")
    status = driver.find_element("id", "status").text
    assert "40 images" in status and "model resnet10t" in status and "table v" in status and "built " in status, status

    # Upload a variant: its base is among the first results.
    variant = next(im for im in served["images"] if im.kind == "jpeg" and im.base_key == "base/img_00001.png")
    query = tmp_path / "query.jpg"
    query.write_bytes(variant.data)
    driver.find_element("id", "file-input").send_keys(str(query))
    _wait(driver, lambda d: _grid_query(d) == "upload" and len(_cards(d)) == 24, "the upload's results")
    uploaded = _cards(driver)
    assert source + variant.base_key in [c["uri"] for c in uploaded[:5]], [c["uri"] for c in uploaded[:5]]
    assert "?upload=query.jpg" in driver.current_url
    _wait(driver, _thumbs_loaded, "the thumbnails")

    # Click a result: the grid changes to that image's neighbours, itself first.
    clicked = uploaded[3]
    driver.find_elements("css selector", "#grid .card")[3].click()
    _wait(driver, lambda d: _grid_query(d) == clicked["id"], "the clicked result's search")
    by_click = _cards(driver)
    assert by_click[0]["id"] == clicked["id"] and by_click[0]["score"] == "1.0000"
    assert [c["id"] for c in by_click] != [c["id"] for c in uploaded]
    assert driver.current_url.endswith(f"?id={clicked['id']}&k=24")

    # Back and forward step through the searches.
    driver.back()
    _wait(driver, lambda d: _grid_query(d) == "upload", "back to the upload's results")
    assert [c["id"] for c in _cards(driver)] == [c["id"] for c in uploaded]
    _wait(driver, _thumbs_loaded, "the thumbnails after back")
    driver.save_screenshot(str(tmp_path / "search-page.png"))
    driver.forward()
    _wait(driver, lambda d: _grid_query(d) == clicked["id"], "forward to the clicked result's search")

    # An unknown image_id: the page says so in words.
    box = driver.find_element("id", "id-input")
    box.clear()
    box.send_keys("999999\n")
    _wait(driver, lambda d: d.find_element("id", "error").is_displayed(), "the error message")
    assert "image_id 999999 is not in index" in driver.find_element("id", "error").text

    seen = _responses(driver)
    kinds = {r["url"].split("?")[0].replace(url, "/").split("/api/")[-1].split("/")[0] for r in seen if "/api/" in r["url"]}
    assert {"status", "search", "thumb"} <= kinds, kinds
    assert sum(r["body"] is not None for r in seen) >= 10
    for secret in (object_store.secret_key, object_store.access_key):
        carrying = [r["url"] for r in seen if secret in r["headers"] or secret in (r["body"] or "")]
        assert not carrying, f"responses carry a credential: {carrying}"
        assert secret not in driver.page_source

    if os.environ.get("SPARSE_EMBED_UPDATE_SCREENSHOT") == "1":  # refresh the README's picture on purpose only
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(tmp_path / "search-page.png", SCREENSHOT)
