"""The web player in Firefox (README, *Web player*: "working in current Chromium and Firefox"):
Debian's headless firefox-esr, driven over WebDriver BiDi (tests/services/firefox.py), opens the
page of a gateway on uvicorn over the real stages in this process (no Ray; the Chromium test,
tests/services/test_web_player.py, runs against Ray Serve). It plays an endless session through
Media Source Extensions, changes its prompt mid-stream, stops it, and plays and downloads a
finished video from the gallery."""

from __future__ import annotations

import itertools

import httpx
import pytest

from tests.services import firefox
from tests.services.fakes import real_stages
from tests.services.gateway.local_app import serving, settings_for
from tests.services.service_calls import OTHER, PROMPT, wait_until


@pytest.fixture(scope="module")
def browser():
    why = firefox.available()
    if why is not None:
        pytest.skip(why)
    with firefox.Firefox() as browser:
        if not browser.run("MediaSource.isTypeSupported('video/mp4; codecs=\"avc1.640015\"')"):
            pytest.skip("this Firefox cannot decode H.264: no libavcodec (make browser adds it)")
        yield browser


@pytest.fixture
def url(tmp_path):
    settings = settings_for(tmp_path, max_sessions_per_replica=2)
    with serving(settings, real_stages(tmp_path).handles) as base:
        yield base


def test_firefox_plays_a_session_changes_its_prompt_and_stops_it(browser, url):
    browser.get(f"{url}/")
    browser.wait_for("window.histream && histream.status === 'idle'")
    assert "Firefox/" in browser.run("navigator.userAgent")
    browser.fill("prompt", PROMPT)
    browser.fill("size", "128x64")
    browser.fill("frames", "")  # endless: it runs until stopped
    browser.click("start")
    browser.wait_for("histream.chunks.length >= 2")
    browser.fill("new-prompt", OTHER)
    browser.fill("transition", "2")
    browser.click("change")
    k = browser.wait_for("histream.accepted[0]")["from_chunk"]
    browser.wait_for(f"histream.chunks.length >= {k + 3}")
    playing = browser.wait_for("!video.paused && video.currentTime > 0 && video.currentTime")
    browser.click("stop")
    browser.wait_for("histream.status === 'ended'")
    state = browser.run("histream")
    assert browser.screenshot()[:8] == b"\x89PNG\r\n\x1a\n"

    chunks = state["chunks"]
    assert state["endReason"] == "closed" and not state["errors"]
    assert [c["index"] for c in chunks] == list(range(len(chunks)))
    # each chunk's fMP4 segment grew the <video> buffer (Firefox's MSE took the codec string
    # read from the init segment's avcC); playback went on through them
    ends = [c["buffered_end"] for c in chunks]
    assert all(b > a for a, b in itertools.pairwise(ends)), ends
    assert ends[-1] == pytest.approx(sum(c["frames"] for c in chunks) / 16, abs=0.1)
    assert playing > 0 and browser.run("video.currentTime") >= playing
    assert [(a["prompt_version"], a["from_chunk"]) for a in state["applied"]] == [(1, k)]
    assert [c["prompt_version"] for c in chunks] == [0] * k + [1] * (len(chunks) - k)


def test_firefox_plays_and_downloads_a_finished_video_from_the_gallery(browser, url):
    body = {"prompt": PROMPT, "seconds": "1", "size": "128x64"}
    video = httpx.post(f"{url}/v1/videos", json=body).json()
    assert wait_until(
        lambda: httpx.get(f"{url}/v1/videos/{video['id']}").json()["status"] == "completed"
    )
    browser.get(f"{url}/")  # the gallery lists the tenant's finished videos
    item = f"document.querySelector('#gallery li p[title^=\"{video['id']}\"]')"
    assert browser.wait_for(f"{item}?.title").startswith(video["id"])  # an element: by its title
    browser.run(f"{item}.parentElement.querySelector('button').click()")
    duration = browser.wait_for("document.getElementById('gallery-video').duration")
    assert 0.9 < duration < 2.0  # about a second, as asked
    browser.run(
        "(window.saved = [], HTMLAnchorElement.prototype.click = function () {"
        " fetch(this.href).then((r) => r.arrayBuffer())"
        " .then((b) => window.saved.push([this.download, b.byteLength])); },"
        f" {item}.parentElement.querySelectorAll('button')[1].click())"
    )
    saved = browser.wait_for("window.saved[0]")
    size = len(httpx.get(f"{url}/v1/videos/{video['id']}/content").content)
    assert saved == [f"{video['id']}.mp4", size]
