"""The soak and `--url` modes of `cosyserve bench` against a live server (the fake model): every
response decodes, the report has its figures, the server drains; a URL's path prefix is kept."""

from __future__ import annotations

import pytest

from cosyserve.tools.loadtest import run_concurrency_bench, split_url
from cosyserve.tools.soak import decoded_seconds, run_soak, soak_ok, sse_audio
from tests.server.conftest import make_settings
from tests.server.fakes import FakeBackend


@pytest.fixture
def fake_url(live_server) -> str:
    from cosyserve.server.app import create_app

    return live_server(create_app(make_settings(), backend=FakeBackend(step_sleep_s=0.002))).url


@pytest.mark.timeout(120)
def test_soak_reports_and_passes_on_a_healthy_server(fake_url) -> None:
    report = run_soak(fake_url, clients=4, minutes=0.1, disconnect_fraction=0.3, warmup_s=2, seed=1)
    assert soak_ok(report), report
    assert report["voice"] == "英文女"  # a built-in voice the server lists (its English one first)
    assert report["requests"] > 10 and report["statuses"] == {"200": report["requests"]}
    assert set(report["requests_by_kind"]) >= {"seed-stream", "seed-file", "openai-stream", "openai-file"}
    assert report["decode_failures"] == 0 and report["disconnects"] > 0 and report["audio_s"] > 0
    rss = report["rss_mb"]
    assert all(rss[k] and rss[k] > 10 for k in ("start", "warm", "middle", "end"))
    assert report["in_flight_after"] == {"queued": 0, "active": 0, "open_streams": 0}


def test_soak_counts_what_does_not_decode() -> None:
    with pytest.raises(ValueError):
        decoded_seconds(b"not an mp3 at all" * 10, "mp3", 16000)
    with pytest.raises(ValueError):
        decoded_seconds(b"\x00" * 3, "pcm", 16000)
    assert decoded_seconds(b"\x00" * 32000, "pcm", 16000) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="done"):
        sse_audio(b'data: {"type": "speech.audio.delta", "audio": ""}\n\n')


@pytest.mark.timeout(120)
def test_concurrency_bench_drives_a_server_by_url(fake_url) -> None:
    report = run_concurrency_bench(None, concurrency=3, url=fake_url, voice="alice", max_seconds=60)
    assert report["mode"] == "url" and report["tokens"] is None
    for section in ("non_stream", "stream"):
        for phase in report[section].values():
            if isinstance(phase, dict):
                assert phase["ok"] == phase["requests"] > 0, phase
    assert report["non_stream"]["batched"]["audio_s"] > 0
    assert report["first_chunk_p50_s"] is not None


def test_urls_keep_their_prefix() -> None:
    assert split_url("http://host:8000/tts/") == ("http", "host", 8000, "/tts")
    assert split_url("https://serve.example") == ("https", "serve.example", 443, "")
    assert split_url("127.0.0.1:9234") == ("http", "127.0.0.1", 9234, "")
    with pytest.raises(ValueError):
        split_url("ftp://host/x")
