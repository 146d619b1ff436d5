"""The web client in real headless Chromium, with an espeak WAV as the microphone.

Needs Debian's chromium + chromium-driver (CI installs them); skipped with a clear reason
when they are missing, so `make test` on a machine without them still runs the rest.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from server.settings import ServerSettings
from streaming.config import DEFAULT_INTERRUPT_PHRASES

from .conftest import fixture_audio
from .test_server import Running, start_server, stop_server
from .test_webrtc import _host_addresses

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parent.parent / "out" / "test-artifacts"

pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason="Debian chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)",
)


@pytest.fixture(scope="module")
def server(tiny_ckpt: Path) -> Iterator[Running]:
    r = start_server(ServerSettings(port=0, checkpoint_dir=tiny_ckpt, log_level="warning"))
    yield r
    stop_server(r)


def _quiet(s: float) -> np.ndarray:
    return np.zeros(int(s * 16000), np.float32)


def _mic_wav(path: Path, stop_after_s: float = 0.8, lead_s: float = 1.0) -> None:
    """The fake microphone: after `lead_s` of quiet, a question heard out in full; then the
    question again and, `stop_after_s` after the end of that turn, "stop omni" (whatever the
    random answer's length, it is still being generated or played then). Chromium loops the file."""
    q = fixture_audio("question")
    audio = np.concatenate(
        [_quiet(lead_s), q, _quiet(7.0), q, _quiet(stop_after_s), fixture_audio("stop_omni"), _quiet(5.0)]
    )
    sf.write(str(path), audio, 16000, subtype="PCM_16")


@pytest.fixture()
def browser(tmp_path: Path) -> Iterator[Any]:
    wav = tmp_path / "mic.wav"
    _mic_wav(wav)
    with _chromium(wav) as driver:
        yield driver


@contextmanager
def _chromium(wav: Path, *, gesture_unlocks_audio: bool = False) -> Iterator[Any]:
    """Headless Chromium whose microphone plays `wav` (16 kHz mono PCM16) in a loop.
    `gesture_unlocks_audio`: audio plays only after a user gesture, as on a phone."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="omnivox-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}",
        "--autoplay-policy=" + ("user-gesture-required" if gesture_unlocks_audio else "no-user-gesture-required"),
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
        f"--user-data-dir={profile}", "--window-size=1000,900",
    ):  # fmt: skip
        opts.add_argument(flag)
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager look for drivers online
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _wait(driver: Any, script: str, timeout: float = 40) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.1)
    stats = driver.execute_script("return window.omnivoxStats")
    raise AssertionError(f"timed out waiting for {script!r}; stats={stats}")


def test_talk_hear_and_interrupt_in_chromium(server: Running, browser: Any) -> None:
    """A browser without WebRTC: the page falls back to the WebSocket (PCM16 in events), is
    answered, and "stop omni" stops its own playback, marked on the timeline."""
    from selenium.webdriver.common.by import By

    browser.get(f"http://127.0.0.1:{server.port}/")
    assert browser.find_element(By.ID, "status").text == "not connected"
    browser.execute_script("window.RTCPeerConnection = undefined")  # as a browser without WebRTC
    browser.find_element(By.ID, "start").click()
    _wait(browser, "return window.omnivoxStats.sessionCreated")
    stats = browser.execute_script("return window.omnivoxStats")
    assert stats["transport"] == "websocket" and stats["fallbacks"] == ["this browser has no WebRTC"], stats
    assert browser.find_element(By.ID, "transport").text == "WebSocket"
    assert browser.find_element(By.ID, "demo").is_displayed() is False  # a checkpoint dir: no demo notice
    # The server finds the turn, the page receives the answer and schedules it for playback.
    _wait(browser, "return window.omnivoxStats.speechStarted >= 1")
    _wait(browser, "return window.omnivoxStats.scheduledSamples > 0 && window.omnivoxStats.audioDeltas > 2")
    _wait(browser, "return document.querySelector('#transcript li.assistant')?.textContent.length > 0")
    # The user's turn is transcribed (the server's ASR) and shown.
    heard = _wait(
        browser,
        "const t = document.querySelector('#transcript li.user')?.textContent;"
        "return t && t !== '(you spoke)' ? t : null",
    )
    assert "what is your" in heard.lower(), heard  # tiny.en through the browser's mic path: "name" or "aim"
    ttfa = _wait(browser, "return window.omnivoxStats.lastTtfaMs")
    assert 0 < ttfa < 10000
    # "stop omni" from the same microphone interrupts the answer; the page's own player stops
    # it at once (measured on its playback clock).
    _wait(browser, "return window.omnivoxStats.interrupts >= 1", timeout=60)
    mark = _wait(browser, "return window.omnivoxStats.marks.find(m => m.stopMs !== undefined)")
    assert mark["label"] in DEFAULT_INTERRUPT_PHRASES and mark["stopMs"] is not None and mark["stopMs"] < 300, mark
    stats = browser.execute_script("return window.omnivoxStats")
    assert stats["errors"] == [] or set(stats["errors"]) <= {"response_cancel_not_active"}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "web_client.png"))
    assert "assistant" in browser.page_source


@pytest.fixture(scope="module")
def server2(tiny2_ckpt: Path) -> Iterator[Running]:
    r = start_server(ServerSettings(port=0, checkpoint_dir=tiny2_ckpt, log_level="warning"))
    yield r
    stop_server(r)


def test_camera_snapshot_and_picture_go_with_the_next_turn(server2: Running, browser: Any, tmp_path: Path) -> None:
    """Mini-Omni2 server: the picture buttons show, a camera snapshot (Chromium's fake camera)
    and a picture file are sent as input_image and shown; the next spoken turn is an image turn."""
    from selenium.webdriver.common.by import By

    browser.get(f"http://127.0.0.1:{server2.port}/")
    assert not browser.find_element(By.ID, "images").is_displayed()  # hidden until the server says images
    browser.find_element(By.ID, "start").click()
    _wait(browser, "return window.omnivoxStats.sessionCreated && window.omnivoxStats.imagesAccepted")
    # Pictures go on the call's data channel (where ICE has an interface; else over the fallback).
    expected = "webrtc" if _host_addresses() else "websocket"
    assert browser.execute_script("return window.omnivoxStats.transport") == expected
    assert browser.find_element(By.ID, "camera").is_displayed()
    browser.find_element(By.ID, "camera").click()
    _wait(browser, "return window.omnivoxStats.imagesSent === 1")
    src = _wait(browser, "return document.querySelector('#transcript li.image img')?.src")
    assert src.startswith("data:image/jpeg;base64,")
    _wait(browser, "return window.omnivoxStats.tasks.includes('image-a1a2')", timeout=60)
    picture = browser.find_element(By.ID, "picture")
    browser.execute_script("arguments[0].style.display = 'block'", picture)
    picture.send_keys(str(Path(__file__).parent / "fixtures" / "picture.png"))
    _wait(browser, "return window.omnivoxStats.imagesSent === 2")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#transcript li.image img")) == 2
    stats = browser.execute_script("return window.omnivoxStats")
    assert "invalid_image" not in stats["errors"] and "image_not_supported" not in stats["errors"]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "web_client_images.png"))


def test_picture_buttons_stay_hidden_on_mini_omni(server: Running, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"http://127.0.0.1:{server.port}/")
    browser.find_element(By.ID, "start").click()
    _wait(browser, "return window.omnivoxStats.sessionCreated")
    assert browser.execute_script("return window.omnivoxStats.imagesAccepted") is False
    assert not browser.find_element(By.ID, "images").is_displayed()


def _server_turns(server: Running) -> list[tuple[str, str] | None]:
    """(type, eagerness) of each open session's turn detection, as the server runs it."""
    tds = [c.session.config.turn_detection for c in list(server.engine.connections)]
    return [None if td is None else (td.type, td.eagerness) for td in tds]


def test_semantic_vad_chosen_in_settings(server: Running, tmp_path: Path) -> None:
    """Settings: semantic_vad with eagerness high, chosen before starting, reaches the server and
    comes back in session.updated (shown next to the connection state); a finished question
    ("What is the capital of France?", Piper) is still answered; changes while connected are sent."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select

    assert server.engine.turn_model is not None  # else semantic_vad would silently end turns on silence
    wav = tmp_path / "mic.wav"
    sf.write(str(wav), np.concatenate([_quiet(1.0), fixture_audio("turn_complete"), _quiet(8.0)]), 16000,
             subtype="PCM_16")  # fmt: skip
    with _chromium(wav) as browser:
        browser.get(f"http://127.0.0.1:{server.port}/")
        assert not browser.find_element(By.ID, "turns").is_displayed()  # nothing reported before a session
        browser.find_element(By.CSS_SELECTOR, ".settings summary").click()
        assert not browser.find_element(By.ID, "eagerness").is_displayed()  # server_vad is the default
        Select(browser.find_element(By.ID, "turn-detection")).select_by_value("semantic_vad")
        Select(browser.find_element(By.ID, "eagerness")).select_by_value("high")
        Select(browser.find_element(By.ID, "connection")).select_by_value("websocket")  # its checks count PCM events
        browser.find_element(By.ID, "start").click()
        td = _wait(browser, "const t = window.omnivoxStats.turnDetection; return t?.type === 'semantic_vad' && t")
        assert td["eagerness"] == "high", td
        assert browser.find_element(By.ID, "turns").text == "turns: semantic (high)"
        assert ("semantic_vad", "high") in _server_turns(server)
        # The question's turn ends and is answered out loud.
        _wait(browser, "return window.omnivoxStats.speechStarted >= 1")
        _wait(browser, "return window.omnivoxStats.scheduledSamples > 0 && window.omnivoxStats.audioDeltas > 2")
        _wait(browser, "return document.querySelector('#transcript li.assistant')?.textContent.length > 0")
        # Changed while connected: a session.update goes out, the echo updates the label.
        Select(browser.find_element(By.ID, "turn-detection")).select_by_value("server_vad")
        _wait(browser, "return window.omnivoxStats.turnDetection?.type === 'server_vad'")
        assert browser.find_element(By.ID, "turns").text == "turns: silence (500 ms)"
        assert not browser.find_element(By.ID, "eagerness").is_displayed()
        Select(browser.find_element(By.ID, "turn-detection")).select_by_value("semantic_vad")
        Select(browser.find_element(By.ID, "eagerness")).select_by_value("low")
        _wait(browser, "return window.omnivoxStats.turnDetection?.eagerness === 'low'")
        assert browser.find_element(By.ID, "turns").text == "turns: semantic (low)"
        assert ("semantic_vad", "low") in _server_turns(server)
        assert browser.execute_script("return window.omnivoxStats.errors") == []
        assert browser.execute_script("return window.omnivoxStats.fallbacks") == []  # chosen, not fallen back to
        assert browser.find_element(By.ID, "transport").text == "WebSocket"
        # A phone-sized screen, Settings open.
        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True})  # fmt: skip
        browser.execute_script("window.scrollTo(0, 0)")
        assert browser.execute_script("return document.documentElement.scrollWidth") <= 390  # no sideways scroll
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "web_client_settings.png"))
        browser.find_element(By.ID, "stop").click()
        _wait(browser, "return window.omnivoxStats.state === 'idle'")
        assert not browser.find_element(By.ID, "turns").is_displayed()
