"""The try-it page in a real headless Chromium, against a real gateway and the simulator.

Uses Debian's ``chromium`` + ``chromium-driver`` through selenium (never a downloaded
browser). Skips, saying so, only where no Chromium or chromedriver is installed.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver import Chrome
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import Gateway, Sim, unique_image
from tests.photos import MIN_IOU, iou, photo, truth

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1000",
)


def _chromium() -> tuple[str, str]:
    browser = next((path for name in BROWSERS if (path := shutil.which(name))), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip(
            "no Chromium found (need `chromium` and `chromedriver` on PATH: apt-get install chromium chromium-driver)"
        )
    return browser, driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chrome]:
    """One headless Chromium for the module, with a fresh profile; never a downloaded browser."""
    binary, driver_path = _chromium()
    tmp = tmp_path_factory.mktemp("chromium")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp / 'profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path and binary: selenium then never runs Selenium Manager (no downloads).
    service = Service(executable_path=driver_path, log_output=str(tmp / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver: Chrome, what: str, condition: Any, timeout: float = 20) -> Any:
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)
    except TimeoutException:
        error = driver.find_element(By.ID, "error")
        shown = error.text if error.is_displayed() else "(no error shown)"
        raise AssertionError(f"timed out waiting for {what}; page error panel: {shown}") from None


def _upload(driver: Chrome, gateway_url: str, key: str, image: Path) -> None:
    driver.get(gateway_url + "/try")
    driver.find_element(By.ID, "key").send_keys(key)
    driver.find_element(By.ID, "file").send_keys(str(image))  # picking a file with a key set analyzes it


def _browser_errors(driver: Chrome) -> list[str]:
    """Console errors, CSP violations included (a blocked script or style shows up here). Chromium
    logs every 4xx fetch; the hash lookup's 404 for an unknown image is the page working as meant."""
    return [
        e["message"]
        for e in driver.get_log("browser")
        if e["level"] == "SEVERE"
        and "favicon" not in e["message"]
        and not ("/v1/faces/analyses/" in e["message"] and "status of 404" in e["message"])
    ]


def test_try_page_draws_boxes_and_tables(browser: Chrome, gateway: Gateway, sim: Sim, tmp_path: Path) -> None:
    image = tmp_path / "two-faces.jpg"
    image.write_bytes(unique_image("jpeg", 480, 320, sim="faces=2"))
    browser.get_log("browser")  # drop what earlier pages logged
    _upload(browser, gateway.url, gateway.key(), image)

    boxes: list[WebElement] = _wait(
        browser, "2 face boxes", lambda d: (b := d.find_elements(By.CSS_SELECTOR, "#boxes .face-box")) and b
    )
    assert len(boxes) == 2
    assert [b.text for b in boxes] == ["1", "2"]
    tables = browser.find_elements(By.CSS_SELECTOR, "#faces table.face-table")
    assert len(tables) == 2
    browser.save_screenshot(str(tmp_path / "try-page.png"))

    # What the page shows is what the API answered (same image: served from the cache now).
    raw = json.loads(browser.find_element(By.ID, "raw").get_attribute("textContent") or "")
    assert raw["schema_version"] == "1"
    assert len(raw["faces"]) == 2
    assert sim.calls == 1
    for table, face in zip(tables, raw["faces"], strict=True):
        rows = {
            tr.find_element(By.TAG_NAME, "th").text: tr.find_element(By.TAG_NAME, "td").text
            for tr in table.find_elements(By.TAG_NAME, "tr")
        }
        assert rows["Age"] == str(face["age"])
        assert rows["Gender"].startswith(face["gender"]["label"])
        assert rows["Gender"].endswith(f"{round(face['gender']['confidence'] * 100)}%")
        assert rows["Emotion"].startswith(face["emotion"]["label"].replace("_", " "))
    assert len(tables[0].find_elements(By.CSS_SELECTOR, ".bar-fill")) > 5  # confidences are drawn as bars

    # Each box sits where the face is, scaled to the displayed image.
    img = browser.find_element(By.ID, "preview")
    _wait(browser, "the preview to load", lambda d: d.execute_script("return arguments[0].naturalWidth", img) > 0)
    scale = img.rect["width"] / raw["image"]["width"]
    for box, face in zip(boxes, raw["faces"], strict=True):
        assert abs(box.rect["x"] - (img.rect["x"] + face["box"]["x"] * scale)) <= 2
        assert abs(box.rect["width"] - face["box"]["width"] * scale) <= 2

    facts = browser.find_element(By.CSS_SELECTOR, ".facts").text
    assert "fwd=uri-miss" in facts  # Cache-Status, read from the response headers
    quota = browser.find_element(By.ID, "quota").text
    assert "daily:" in quota
    assert "left" in quota
    assert browser.find_element(By.ID, "request-id").text == raw["request_id"]
    assert _browser_errors(browser) == []

    # The key never left page memory.
    stored = browser.execute_script("return [localStorage.length, sessionStorage.length, document.cookie]")
    assert stored == [0, 0, ""]


def test_try_with_the_sample_draws_a_box_on_the_face(browser: Chrome, gateway_factory: Any, tmp_path: Path) -> None:
    """The first click of a new user: `make run` (sandbox mode, real detector), key, "Try with a sample"."""
    pytest.importorskip("cv2", reason="the sandbox extra is not installed: pip install -e '.[sandbox]'")
    gw: Gateway = gateway_factory(sim=None)
    browser.get_log("browser")
    browser.get(gw.url + "/try")
    assert "public domain" in browser.find_element(By.CSS_SELECTOR, ".sample .credit").text
    browser.find_element(By.ID, "key").send_keys(gw.key())
    browser.find_element(By.ID, "sample").click()

    boxes: list[WebElement] = _wait(
        browser, "a face box", lambda d: (b := d.find_elements(By.CSS_SELECTOR, "#boxes .face-box")) and b
    )
    assert len(boxes) == 1
    raw = json.loads(browser.find_element(By.ID, "raw").get_attribute("textContent") or "")
    assert raw["source"]["provider"] == "simulator"
    assert (raw["image"]["width"], raw["image"]["height"]) == (512, 512)
    img = browser.find_element(By.ID, "preview")
    _wait(browser, "the preview to load", lambda d: d.execute_script("return arguments[0].naturalWidth", img) > 0)
    browser.save_screenshot(str(tmp_path / "try-sample.png"))
    # The box as drawn on the screen, back in the photo's pixels, covers her face.
    scale = img.rect["width"] / raw["image"]["width"]
    r = boxes[0].rect
    drawn = (
        round((r["x"] - img.rect["x"]) / scale),
        round((r["y"] - img.rect["y"]) / scale),
        round(r["width"] / scale),
        round(r["height"] / scale),
    )
    face = truth("astronaut.jpg")[0]
    assert iou(drawn, face) >= MIN_IOU, (drawn, face)
    assert _browser_errors(browser) == []


def _requests(gw: Gateway, route: str) -> float:
    """Requests answered on ``route`` (a route template), all statuses and tenants together."""
    text = httpx.get(gw.url + "/metrics", timeout=5).text
    pattern = rf'^facegate_http_requests_total\{{[^}}]*route="{re.escape(route)}"[^}}]*\}} (\S+)$'
    return sum(float(v) for v in re.findall(pattern, text, re.MULTILINE))


def test_try_page_hashes_first_and_uploads_only_unknown_images(
    browser: Chrome, gateway_factory: Any, sim: Sim, tmp_path: Path
) -> None:
    gw: Gateway = gateway_factory()  # its own counters
    image = tmp_path / "again.jpg"
    image.write_bytes(unique_image("jpeg", 320, 240, sim="faces=1"))
    cache = (By.ID, "cache-status")

    _upload(browser, gw.url, gw.key(), image)  # unknown: looked up (404), then uploaded
    _wait(browser, "the first answer", lambda d: "fwd=uri-miss" in d.find_element(*cache).text)
    assert _requests(gw, "/v1/faces/analyze") == 1
    assert _requests(gw, "/v1/faces/analyses/{sha256}") == 1

    _upload(browser, gw.url, gw.key(), image)  # known now: the lookup answers, nothing is uploaded
    _wait(browser, "the lookup's answer", lambda d: "not uploaded" in d.find_element(*cache).text)
    assert "facegate; hit" in browser.find_element(*cache).text
    assert _requests(gw, "/v1/faces/analyze") == 1
    assert _requests(gw, "/v1/faces/analyses/{sha256}") == 2
    assert len(browser.find_elements(By.CSS_SELECTOR, "#boxes .face-box")) == 1

    # Without WebCrypto (a page served over plain http from another host): the page just uploads.
    browser.get(gw.url + "/try")
    browser.execute_script("Object.defineProperty(Crypto.prototype, 'subtle', {get: () => undefined});")
    browser.find_element(By.ID, "key").send_keys(gw.key())
    browser.find_element(By.ID, "file").send_keys(str(image))
    _wait(browser, "the uploaded hit", lambda d: "facegate; hit" in d.find_element(*cache).text)
    assert "not uploaded" not in browser.find_element(*cache).text
    assert _requests(gw, "/v1/faces/analyze") == 2
    assert _requests(gw, "/v1/faces/analyses/{sha256}") == 2
    assert _browser_errors(browser) == []
    assert sim.calls == 1


def test_try_page_fits_a_phone(browser: Chrome, gateway: Gateway, sim: Sim, tmp_path: Path) -> None:
    image = tmp_path / "one-face.png"
    image.write_bytes(unique_image("png", 900, 600, sim="faces=1"))
    # A phone's viewport, with mobile rules (meta viewport, touch) as Chromium's device mode applies them.
    metrics = {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True}
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    try:
        _upload(browser, gateway.url, gateway.key(), image)
        _wait(browser, "a face box", lambda d: d.find_elements(By.CSS_SELECTOR, "#boxes .face-box"))
        width, scroll = browser.execute_script("return [window.innerWidth, document.documentElement.scrollWidth]")
        assert width == 390
        assert scroll <= width, f"the page is {scroll - width}px wider than a phone screen"
        img = browser.find_element(By.ID, "preview")
        assert img.rect["width"] <= 390
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_try_page_shows_problem_not_stack(browser: Chrome, gateway: Gateway, sim: Sim, tmp_path: Path) -> None:
    image = tmp_path / "x.jpg"
    image.write_bytes(unique_image())
    _upload(browser, gateway.url, "fg_not-a-key", image)
    error = _wait(browser, "the error panel", lambda d: (e := d.find_element(By.ID, "error")).is_displayed() and e)
    assert "Missing or unknown API key" in error.text  # the problem's title
    assert "Authorization: Bearer" in error.text  # and its detail
    assert "unauthorized" in error.text
    assert not browser.find_element(By.ID, "result").is_displayed()

    # A file that is no image: the page shows the problem text (as text: markup stays inert).
    bad = tmp_path / "<img src=x onerror=alert(1)>.jpg"
    bad.write_bytes(b"<script>alert(1)</script>")
    _upload(browser, gateway.url, gateway.key(), bad)
    _wait(browser, "the 415", lambda d: "Unsupported image type" in d.find_element(By.ID, "error").text)
    assert browser.find_elements(By.CSS_SELECTOR, "#error img, #error script, #drop img") == []
    assert "<img src=x" in browser.find_element(By.ID, "file-name").text
    assert sim.calls == 0


def test_try_page_headers_are_strict(gateway: Gateway) -> None:
    page = httpx.get(gateway.url + "/try", timeout=10)
    assert page.status_code == 200
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp
    assert "default-src 'none'" in csp
    assert "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp
    assert "unsafe-eval" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "<script>" not in page.text
    assert not re.search(r"\son[a-z]+=", page.text)
    sample = httpx.get(gateway.url + "/try/sample.jpg", timeout=10)
    assert sample.headers["content-type"] == "image/jpeg"
    assert sample.content == photo("astronaut.jpg")  # the photo whose true face tests/fixtures records
    script = httpx.get(gateway.url + "/try/try.js", timeout=10)
    assert script.headers["content-type"].startswith("text/javascript")
    unsafe = re.compile(
        r"\.(inner|outer)HTML\s*=|insertAdjacentHTML|document\.write|localStorage|sessionStorage|cookie"
    )
    assert not unsafe.findall(script.text)


def test_try_page_off_is_404(gateway_factory: Any) -> None:
    gw: Gateway = gateway_factory(env={"FACEGATE_TRY_PAGE": "false"})
    for path in ("/try", "/try/try.js", "/try/try.css", "/try/sample.jpg"):
        response = httpx.get(gw.url + path, timeout=10)
        assert response.status_code == 404
        assert response.headers["content-type"] == "application/problem+json"
