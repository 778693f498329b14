"""The web player at `/` in a real browser: headless Debian Chromium driven through ChromeDriver
(Selenium). The page streams a session through Media Source Extensions, changes its prompt
mid-stream, stops it, and plays a finished video from its gallery. `make test` installs the
browser (packages chromium and chromium-driver); where it cannot be installed the browser tests
are skipped, saying so. A screenshot of the page is saved under outputs/test-artifacts/."""

from __future__ import annotations

import itertools
import json
import os
import re
from pathlib import Path

import httpx
import pytest

from bench.screenshot import BROWSER, DRIVER, chromium, wait_for
from tests.services.service_calls import PROMPT, client, metric, wait_until, wait_video

OTHER = "a small green square moving slowly up on a white background"
ARTIFACTS = Path(os.environ.get("HISTREAM_TEST_ARTIFACTS", "outputs/test-artifacts"))


def page_config(html: str) -> dict:
    found = re.search(r'<script id="config" type="application/json">(.*?)</script>', html, re.S)
    assert found, "the page carries its settings"
    return json.loads(found.group(1))


def test_the_page_is_served_at_the_root_with_this_servers_settings(service):
    response = httpx.get(f"{service.local_url}/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    assert "<video" in html and "MediaSource" in html and "/*PLAYER_JS*/" not in html
    config = page_config(html)
    assert config["model"] == "tiny" and config["tenancy"] is False
    assert config["default_mode"] in config["modes"] and "histream+" in config["modes"]
    assert config["size"] == "192x128" and config["max_num_frames"] == 481


def test_the_page_asks_for_a_key_only_when_tenancy_is_on(tenants_service):
    response = httpx.get(f"{tenants_service.url}/")  # the page itself needs no key
    assert response.status_code == 200 and page_config(response.text)["tenancy"] is True
    assert httpx.get(f"{tenants_service.url}/v1/videos").status_code == 401  # the API does


@pytest.fixture(scope="module")
def browser():
    if not (os.access(BROWSER, os.X_OK) and os.access(DRIVER, os.X_OK)):
        pytest.skip(
            f"no Chromium at {BROWSER} or ChromeDriver at {DRIVER}: the browser tests need the "
            "Debian packages chromium and chromium-driver (make test installs them)"
        )
    pytest.importorskip("selenium", reason="selenium is not installed")
    driver = chromium(1280, 900)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def seen(browser, expression: str, timeout: float = 90.0):
    return wait_for(browser, expression, timeout)


def fill(browser, field: str, value: str) -> None:
    element = browser.find_element("id", field)
    element.clear()
    element.send_keys(value)


def test_the_page_streams_a_session_changes_its_prompt_and_stops_it(service, browser):
    browser.get(f"{service.local_url}/")
    seen(browser, "window.histream && histream.status === 'idle'")
    fill(browser, "prompt", PROMPT)
    fill(browser, "frames", "")  # endless: it runs until stopped
    browser.find_element("id", "start").click()
    seen(browser, "histream.chunks.length >= 2")
    fill(browser, "new-prompt", OTHER)
    fill(browser, "transition", "2")
    browser.find_element("id", "change").click()
    accepted = seen(browser, "histream.accepted[0]")
    k = accepted["from_chunk"]
    seen(browser, f"histream.chunks.length >= {k + 3}")
    playing = seen(browser, "!video.paused && video.currentTime > 0 && video.currentTime")
    browser.find_element("id", "stop").click()
    seen(browser, "histream.status === 'ended'")
    state = browser.execute_script("return histream;")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "player.png"
    assert browser.save_screenshot(str(shot)) and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    chunks = state["chunks"]
    assert state["endReason"] == "closed" and not state["errors"]
    assert [c["index"] for c in chunks] == list(range(len(chunks))) and len(chunks) < 100
    # every chunk's segment grew the video element's buffer; playback went on through them
    ends = [c["buffered_end"] for c in chunks]
    assert all(b > a for a, b in itertools.pairwise(ends)), ends
    times = [c["current_time"] for c in chunks]
    assert all(b >= a for a, b in itertools.pairwise(times)) and times[-1] > times[0]
    assert playing > 0 and browser.execute_script("return video.currentTime;") >= playing
    assert ends[-1] == pytest.approx(sum(c["frames"] for c in chunks) / 16, abs=0.1)
    # the prompt change was acknowledged, and later chunks carry its version
    assert [(a["prompt_version"], a["from_chunk"]) for a in state["applied"]] == [(1, k)]
    assert [c["prompt_version"] for c in chunks] == [0] * k + [1] * (len(chunks) - k)
    # the page showed what it measured
    shown = {name: browser.find_element("id", name).text for name in ("chunks", "fps", "latency")}
    assert shown["chunks"] == str(len(chunks)) and float(shown["fps"]) > 0
    assert shown["latency"].endswith(" ms")
    # the codec string the page gave MSE is the init segment's avcC profile, compatibility and
    # level bytes (ISO/IEC 14496-15: after the box type, a version byte, then those three)
    from services.storage import Layout

    init = service.local.get(Layout().session_init_key(state["sessionId"]))
    at = init.index(b"avcC") + 5
    codec = browser.execute_script(
        "return codecOf(new Uint8Array(arguments[0]).buffer);", list(init)
    )
    assert codec == "avc1." + init[at : at + 3].hex() and codec.startswith("avc1.64")  # High
    # stop freed the session
    assert wait_until(
        lambda: metric(service.local_url, "histream_active_sessions", '{kind="session"}') == 0
    )


def test_the_gallery_plays_a_finished_video(service, browser):
    api = client(service.local_url)
    video = api.videos.create(prompt=PROMPT, seconds="1", size="192x128")
    assert wait_video(api, video.id).status == "completed"
    browser.get(f"{service.local_url}/")
    seen(browser, f"document.querySelector('#gallery li p[title^=\"{video.id}\"]')")
    browser.execute_script(
        f"document.querySelector('#gallery li p[title^=\"{video.id}\"]')"
        ".parentElement.querySelector('button').click();"
    )
    duration = seen(browser, "document.getElementById('gallery-video').duration")
    assert 0.9 < duration < 2.0  # about a second, as asked
    # Download saves the MP4 under the video's id
    browser.execute_script(
        "window.saved = []; HTMLAnchorElement.prototype.click = function () {"
        " fetch(this.href).then((r) => r.arrayBuffer())"
        " .then((b) => window.saved.push([this.download, b.byteLength])); };"
        f"document.querySelector('#gallery li p[title^=\"{video.id}\"]')"
        ".parentElement.querySelectorAll('button')[1].click();"
    )
    saved = seen(browser, "window.saved[0]")
    size = len(httpx.get(f"{service.local_url}/v1/videos/{video.id}/content").content)
    assert saved == [f"{video.id}.mp4", size]


def test_the_page_keeps_the_api_key_in_local_storage(tenants_service, browser):
    key = tenants_service.keys["alpha"]
    browser.get(f"{tenants_service.url}/")
    seen(browser, "window.histream && histream.status === 'idle'")
    browser.execute_script("localStorage.clear();")
    fill(browser, "api-key", key)
    fill(browser, "prompt", PROMPT)
    fill(browser, "frames", "9")
    fill(browser, "size", "128x64")  # the tenants app's refine budget holds one such session
    browser.find_element("id", "start").click()
    ended = seen(browser, "['ended', 'failed'].includes(histream.status) && histream")
    assert ended["endReason"] == "completed", ended["errors"]
    assert browser.execute_script("return localStorage.getItem('histream-api-key');") == key
    browser.get(f"{tenants_service.url}/")  # a later visit: the key is filled in
    seen(browser, "window.histream && histream.status === 'idle'")
    assert browser.find_element("id", "api-key").get_attribute("value") == key
