"""The web playground, as a person uses it: a real server (uvicorn on loopback, embedded voice)
and headless Debian Chromium driven over the DevTools protocol. Type text, press Speak, hear it
streamed (the page's Web Audio clock must advance through the whole clip), read the timings,
download the result. A screenshot goes to the test's tmp_path and to test-artifacts/.

Chromium comes from Debian (``scripts/ensure-test-deps.sh`` installs it); without it the browser
tests skip with that reason, or fail when ``CI`` or ``COSYSERVE_REQUIRE_BROWSER=1`` is set.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.helpers.cdp import Chromium, Page, find_chromium
from tests.helpers.live_server import LiveServer, embedded_app
from tests.helpers.speech import decode_body

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
TEXT = (
    "Good morning! The playground streams speech while it is being made. "
    "Each sentence plays as soon as it arrives."
)
API_KEY = "playground-test-key"


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with LiveServer(embedded_app()) as live:
        # Warm the voice (first ONNX run) so the page measures steady-state latency.
        httpx.get(f"{live.url}/health", timeout=60).raise_for_status()
        yield live


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[LiveServer]:
    with LiveServer(embedded_app(api_key=API_KEY)) as live:
        yield live


@pytest.fixture(scope="module")
def cloning_server() -> Iterator[LiveServer]:
    """A backend that can clone (the server tests' fake: sine tones, every mode)."""
    from cosyserve.server.app import create_app
    from cosyserve.settings import Settings
    from tests.helpers.live_server import ensure_playground
    from tests.server.fakes import FakeBackend

    app = create_app(Settings(api_key=None, cors_origins=[], model_dir=None), backend=FakeBackend())
    ensure_playground(app)
    with LiveServer(app) as live:
        yield live


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    binary = find_chromium()
    if binary is None:
        reason = (
            "chromium is not installed: run scripts/ensure-test-deps.sh "
            "(apt-get install chromium chromium-driver)"
        )
        if os.environ.get("CI") or os.environ.get("COSYSERVE_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    profile = tmp_path_factory.mktemp("chromium") / "profile"  # fresh --user-data-dir
    with Chromium.launch(profile, binary=binary) as chromium:
        yield chromium


def open_playground(browser: Chromium, url: str, state: str = "ready") -> Page:
    page = browser.new_page(width=1280, height=900)
    page.goto(f"{url}/")
    page.wait_for(f"document.body && document.body.dataset.state === {json.dumps(state)}", timeout=30)
    return page


def number(page: Page, element_id: str) -> float:
    text = page.text(f"#{element_id}")
    try:
        return float(text)
    except ValueError:
        pytest.fail(f"#{element_id} shows {text!r}, not a number; status: {page.text('#status')!r}")


# --------------------------------------------------------------------------------------------
# The page and its assets over plain HTTP (no browser)
# --------------------------------------------------------------------------------------------


def test_page_and_assets_are_served(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        page = client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        for element in ("first-audio-ms", "rtf", "status", "download", "api-key"):
            assert f'id="{element}"' in page.text
        assert "http://" not in page.text and "https://" not in page.text  # offline: no CDN
        script = client.get("/static/app.js")
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]
        style = client.get("/static/style.css")
        assert style.status_code == 200 and style.headers["content-type"].startswith("text/css")
        for missing in ("/static/nope.js", "/static/index.html.bak", "/static/..%2Fapp.py"):
            assert client.get(missing).status_code == 404, missing


def test_encode_endpoint_returns_the_same_audio(server: LiveServer) -> None:
    rate = 22050
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(rate) / rate) * 32767).astype("<i2")
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for fmt in ("mp3", "opus", "flac"):
            response = client.post(
                f"/playground/encode?format={fmt}&sample_rate={rate}",
                content=tone.tobytes(),
                headers={"Content-Type": "audio/pcm"},
            )
            assert response.status_code == 200, response.text
            seconds = len(decode_body(response.content, fmt)) / 16000
            assert seconds == pytest.approx(1.0, abs=0.08), fmt
        bad = client.post(f"/playground/encode?format=exe&sample_rate={rate}", content=tone.tobytes())
        assert bad.status_code == 400


def test_page_and_assets_are_public_with_an_api_key(keyed_server: LiveServer) -> None:
    from cosyserve.server.routers.playground import PUBLIC_PATHS

    with httpx.Client(base_url=keyed_server.url, timeout=30) as client:
        for path in sorted(PUBLIC_PATHS):
            response = client.get(path)
            assert response.status_code == 200, (
                f"{path} answers {response.status_code} on a server with an API key: the page cannot load. "
                "Add cosyserve.server.routers.playground.PUBLIC_PATHS to OPEN_PATHS in cosyserve/server/app.py"
            )
        assert client.get("/list_voices").status_code == 401
        encode = client.post("/playground/encode?format=wav&sample_rate=22050", content=b"\0\0" * 100)
        assert encode.status_code == 401  # the encoder spends CPU: it is behind the key


# --------------------------------------------------------------------------------------------
# In the browser
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_speak_streams_plays_and_reports_timings(
    server: LiveServer, browser: Chromium, tmp_path: Path
) -> None:
    page = open_playground(browser, server.url)
    assert "en_US-joe-medium" in page.evaluate(
        "[...document.querySelectorAll('#voice option')].map(o => o.value)"
    )
    # The embedded voice cannot clone: the form is disabled and says why.
    assert page.evaluate("document.getElementById('clone-fieldset').disabled") is True
    note = page.text("#clone-note")
    assert "embedded" in note and "--model_dir" in note

    page.type_into("#text", TEXT)
    assert page.evaluate("document.getElementById('text').value") == TEXT
    page.click("#speak")

    page.wait_for("['done', 'error'].includes(document.body.dataset.state)", timeout=90)
    assert page.evaluate("document.body.dataset.state") == "done", page.text("#status")
    first_audio_ms = number(page, "first-audio-ms")
    rtf = number(page, "rtf")
    speed_x = number(page, "speed-x")
    audio_s = number(page, "audio-s")
    elapsed_s = number(page, "elapsed-s")
    # Played audio comes from the AudioContext clock: it only grows if audio really played.
    page.wait_for("document.body.dataset.playback === 'ended'", timeout=audio_s + 30)
    played_s = number(page, "played-s")
    stalls = int(number(page, "stalls"))

    download = page.evaluate(
        "(async () => { const a = document.getElementById('download');"
        " const bytes = a.href.startsWith('blob:') ? (await (await fetch(a.href)).arrayBuffer()).byteLength : 0;"
        " return {href: a.href, name: a.download, format: a.dataset.format, bytes}; })()"
    )
    shot = page.screenshot(tmp_path / "playground.png")
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / "playground.png")
    timings = {
        "first_audio_ms": first_audio_ms,
        "rtf": rtf,
        "speed_x": speed_x,
        "audio_s": audio_s,
        "elapsed_s": elapsed_s,
        "played_s": played_s,
        "stalls": stalls,
    }
    (ARTIFACTS / "playground-timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    print(f"playground timings: {timings}")

    assert 0 < first_audio_ms < 15_000
    assert 0 < first_audio_ms <= elapsed_s * 1000
    assert audio_s > 3.0  # three sentences
    assert rtf == pytest.approx(elapsed_s / audio_s, rel=0.02, abs=0.002)
    assert 0 < rtf < 5.0  # sane, not a benchmark: a busy shared 2-core CPU may be slow
    assert played_s == pytest.approx(audio_s, abs=0.05)
    assert download["href"].startswith("blob:") and download["name"].endswith(".wav")
    assert download["bytes"] == pytest.approx(44 + audio_s * 22050 * 2, abs=2 * 22050 * 0.01 + 2)
    assert not [line for line in page.console if line.startswith("uncaught")], page.console

    # Another download format re-encodes what was heard, without synthesising again.
    page.evaluate(
        "(() => { const s = document.getElementById('format'); s.value = 'mp3';"
        " s.dispatchEvent(new Event('change')); })()"
    )
    page.wait_for("document.getElementById('download').dataset.format === 'mp3'", timeout=30)
    mp3 = page.evaluate(
        "(async () => { const a = document.getElementById('download');"
        " const b = new Uint8Array(await (await fetch(a.href)).arrayBuffer());"
        " return {name: a.download, head: [...b.slice(0, 3)], bytes: b.length}; })()"
    )
    assert mp3["name"].endswith(".mp3")
    assert bytes(mp3["head"]) == b"ID3" or (mp3["head"][0] == 0xFF and mp3["head"][1] & 0xE0 == 0xE0)
    assert 0 < mp3["bytes"] < download["bytes"]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_api_key_is_asked_for_and_remembered(keyed_server: LiveServer, browser: Chromium) -> None:
    page = open_playground(browser, keyed_server.url, state="needs-key")
    assert "API key" in page.text("#status")
    page.type_into("#api-key", API_KEY)
    page.click("#api-key-save")
    page.wait_for("document.body.dataset.state === 'ready'", timeout=30)
    assert page.evaluate("localStorage.getItem('cosyserve.apiKey')") == API_KEY
    # A reload reads the key back from localStorage.
    page.goto(f"{keyed_server.url}/")
    page.wait_for("document.body && document.body.dataset.state === 'ready'", timeout=30)
    assert page.evaluate("document.getElementById('api-key').value") == API_KEY


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_clone_form_saves_a_voice(cloning_server: LiveServer, browser: Chromium, tmp_path: Path) -> None:
    from cosyserve.audio.encode import encode_all

    rate = 16000
    prompt = tmp_path / "prompt.wav"
    prompt.write_bytes(encode_all(0.2 * np.sin(2 * np.pi * 220 * np.arange(3 * rate) / rate), rate, "wav"))

    page = open_playground(browser, cloning_server.url)
    assert page.evaluate("document.getElementById('clone-fieldset').disabled") is False
    assert page.evaluate("document.getElementById('clone-note').hidden") is True
    page.type_into("#clone-name", "my-clone")
    page.set_files("#clone-audio", [prompt])
    page.type_into("#clone-transcript", "This is what the recording says.")
    page.click("#clone-submit")
    page.wait_for(
        "document.getElementById('clone-status').dataset.kind === 'ok'"
        " || document.getElementById('clone-status').dataset.kind === 'error'",
        timeout=30,
    )
    assert page.evaluate("document.getElementById('clone-status').dataset.kind") == "ok", page.text(
        "#clone-status"
    )
    # The new voice is listed and selected, and it speaks (through the CosyVoice API this time).
    assert page.evaluate("document.getElementById('voice').value") == "my-clone"
    page.evaluate(
        "(() => { const s = document.getElementById('endpoint'); s.value = 'seed';"
        " s.dispatchEvent(new Event('change')); })()"
    )
    page.type_into("#text", "Hello there. This is the cloned voice.")
    page.click("#speak")
    page.wait_for("['done', 'error'].includes(document.body.dataset.state)", timeout=60)
    assert page.evaluate("document.body.dataset.state") == "done", page.text("#status")
    assert number(page, "audio-s") > 0
