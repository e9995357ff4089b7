"""``cosyserve bench --realtime --json``: the embedded voice without --model_dir, and a generated
v1 model; the playback simulation behind ``underrun_s``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cosyserve.cli import main
from cosyserve.tools.realtime_bench import playback_underruns, words

SHORT_TEXT = "Hello there. How are you today? Fine, thanks."


def test_playback_underruns() -> None:
    # 1 s arrives at t=0 (plays 0-1), 1 s at t=1.5 (0.5 s gap), 1 s at t=2.0 (still playing: none).
    assert playback_underruns([(0.0, 1.0), (1.5, 1.0), (2.0, 1.0)]) == (pytest.approx(0.5), 1)
    assert playback_underruns([(0.0, 2.0), (1.0, 1.0), (2.5, 1.0)]) == (0.0, 0)
    assert playback_underruns([(0.0, 0.1), (0.105, 0.1)]) == (pytest.approx(0.005), 0)  # jitter, not a gap
    assert playback_underruns([]) == (0.0, 0)
    assert words("Hi there.  Bye") == ["Hi", " there.", "  Bye"]


def run_bench(capsys: pytest.CaptureFixture[str], *extra: str) -> dict:
    code = main(["--log-level", "WARNING", "bench", "--realtime", "--json", "--runs", "1", *extra])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)


def check(report: dict, backend: str) -> None:
    assert report["mode"] == "realtime" and report["backend"] == backend
    assert 0 < report["first_audio_after_sentence_s"] < 30
    assert report["first_audio_after_sentence_s"] <= report["first_audio_s"]
    assert report["underrun_s"] >= 0 and report["underruns"] >= 0
    assert report["audio_s"] > 1.0 and report["per_run"][0]["segments"] >= 3


@pytest.mark.timeout(240)
def test_bench_realtime_on_the_embedded_voice(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COSYSERVE_MODEL_DIR", raising=False)
    report = run_bench(capsys, "--text", SHORT_TEXT)
    check(report, "embedded")
    assert report["voice"] == "en_US-joe-medium" and report["model_dir"] is None


@pytest.mark.timeout(300)
def test_bench_realtime_on_a_generated_v1_model(
    capsys: pytest.CaptureFixture[str], tiny_model_dir: Path
) -> None:
    report = run_bench(capsys, "--model_dir", str(tiny_model_dir), "--text", SHORT_TEXT)
    check(report, "cosyvoice")
    assert report["voice"] == "英文女"
