"""The playground's "Speak as I type" mode in headless Chromium: a real server (embedded voice),
the page's WebSocket session, text typed word by word. The first sentence must be heard (the
page's Web Audio clock advances) while the second is still being typed; "Speak the rest" says the
unfinished sentence. A screenshot goes to test-artifacts/playground-live.png.

Chromium comes from Debian (``scripts/ensure-test-deps.sh``); without it the test skips, or fails
when ``CI`` or ``COSYSERVE_REQUIRE_BROWSER=1`` is set.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers.cdp import Chromium, Page, find_chromium
from tests.helpers.live_server import LiveServer, embedded_app

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
FIRST = "Hello there, this is the live mode."
SECOND = "The second sentence is still being typed"


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with LiveServer(embedded_app()) as live:
        httpx.get(f"{live.url}/health", timeout=60).raise_for_status()
        yield live


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    binary = find_chromium()
    if binary is None:
        reason = "chromium is not installed: run scripts/ensure-test-deps.sh"
        if os.environ.get("CI") or os.environ.get("COSYSERVE_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    with Chromium.launch(tmp_path_factory.mktemp("chromium") / "profile", binary=binary) as chromium:
        yield chromium


def type_words(page: Page, text: str, pause_s: float = 0.08) -> None:
    """Type ``text`` word by word (each word with the space before it), as a person would."""
    for piece in re.findall(r"\s*\S+", text):
        page.type_into("#text", piece, replace=False)
        time.sleep(pause_s)


def number(page: Page, element_id: str) -> float:
    text = page.text(f"#{element_id}")
    try:
        return float(text)
    except ValueError:
        pytest.fail(f"#{element_id} shows {text!r}; status: {page.text('#status')!r}")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_speak_as_i_type(server: LiveServer, browser: Chromium, tmp_path: Path) -> None:
    page = browser.new_page(width=1280, height=900)
    page.goto(f"{server.url}/")
    page.wait_for("document.body && document.body.dataset.state === 'ready'", timeout=30)
    assert page.evaluate("document.body.dataset.live") == "off"
    page.evaluate("(() => { const t = document.getElementById('text'); t.value = ''; })()")

    page.click("#live")
    page.wait_for("document.body.dataset.live === 'open'", timeout=30)
    assert "Speak the rest" in page.text("#speak")
    assert page.evaluate("document.getElementById('stop').disabled") is False

    first_word, rest = SECOND.split(" ", 1)
    type_words(page, f"{FIRST} {first_word}")  # the next word confirms the sentence end
    # Heard while the second sentence is being typed: the Web Audio clock plays it.
    page.wait_for("Number(document.getElementById('audio-s').textContent) > 0", timeout=60)
    type_words(page, " " + rest)
    first_audio_ms = number(page, "first-audio-ms")
    first_sentence_s = number(page, "audio-s")
    page.wait_for("Number(document.getElementById('played-s').textContent) > 0.5", timeout=30)
    assert page.evaluate("document.body.dataset.live") == "open"

    page.click("#speak")  # "Speak the rest": the unfinished sentence too
    page.wait_for(
        f"Number(document.getElementById('audio-s').textContent) > {first_sentence_s + 0.5}", timeout=60
    )
    page.wait_for("document.getElementById('status').textContent.includes('spoken')", timeout=60)
    total_s = number(page, "audio-s")
    page.wait_for(
        f"Number(document.getElementById('played-s').textContent) >= {total_s - 0.05}", timeout=total_s + 30
    )

    shot = page.screenshot(tmp_path / "playground-live.png")
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / "playground-live.png")

    assert 0 < first_audio_ms < 15_000
    assert 1.0 < first_sentence_s < total_s
    assert page.evaluate("document.getElementById('text').value") == f"{FIRST} {SECOND}"
    assert int(number(page, "stalls")) == 0
    assert not [line for line in page.console if line.startswith("uncaught")], page.console

    page.click("#live")  # off: the session closes
    page.wait_for("document.body.dataset.live === 'off'", timeout=10)
    assert "Speak" in page.text("#speak") and "rest" not in page.text("#speak")
