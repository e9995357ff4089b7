"""`cosyserve serve`: flags (the seed's names), environment variables, and start-up wiring."""

from __future__ import annotations

import pytest

from cosyserve.cli import build_parser
from cosyserve.server import launch
from cosyserve.settings import Settings, settings_from_args
from tests.server.fakes import FakeBackend


def _parse(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_seed_flags_and_dashed_aliases(monkeypatch) -> None:
    monkeypatch.delenv("COSYSERVE_PORT", raising=False)
    args = _parse(
        "--model_dir",
        "/models/sft",
        "--port",
        "50000",
        "--load_jit",
        "--load-trt",
        "--fp16",
        "--trt_concurrent",
        "2",
        "--host",
        "0.0.0.0",
        "--no-auto",
        "--max-active",
        "3",
    )
    settings = settings_from_args(args)
    assert settings.model_dir == "/models/sft" and settings.port == 50000
    assert settings.load_jit and settings.load_trt and settings.fp16 and not settings.auto
    assert settings.trt_concurrent == 2 and settings.host == "0.0.0.0" and settings.max_active == 3


def test_defaults_and_environment(monkeypatch) -> None:
    for name in ("COSYSERVE_PORT", "COSYSERVE_MODEL_DIR", "COSYSERVE_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    defaults = settings_from_args(_parse())
    assert defaults.port == 9234 and defaults.auto and defaults.model_dir is None
    assert defaults.api_key is None and defaults.cors_origins == []

    monkeypatch.setenv("COSYSERVE_PORT", "8000")
    monkeypatch.setenv("COSYSERVE_API_KEY", "k")
    monkeypatch.setenv("COSYSERVE_CORS_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("COSYSERVE_LOAD_TRT", "true")
    env = settings_from_args(_parse())
    assert env.port == 8000 and env.load_trt and env.api_key.get_secret_value() == "k"
    assert env.cors_origins == ["https://a.example", "https://b.example"]
    assert settings_from_args(_parse("--port", "7000")).port == 7000  # a flag wins
    assert env.public_dict()["api_key"] == "set"


def test_invalid_values_are_rejected(monkeypatch, capsys) -> None:
    monkeypatch.delenv("COSYSERVE_PORT", raising=False)
    assert launch.main(_parse("--port", "99999")) == 2
    assert "port" in capsys.readouterr().err
    with pytest.raises(ValueError):
        Settings(max_active=0)


def test_main_builds_backend_and_runs_uvicorn(monkeypatch, capsys) -> None:
    started = {}

    def fake_run(self):
        started["app"] = self.config.app
        started["graceful"] = self.config.timeout_graceful_shutdown

    monkeypatch.setattr("uvicorn.Server.run", fake_run)
    monkeypatch.setattr(
        "cosyserve.server.app.build_backend",
        lambda settings: (FakeBackend(), {"plan": "fake", "fallbacks": ["trt: no CUDA"]}),
    )
    monkeypatch.delenv("COSYSERVE_PORT", raising=False)
    assert launch.main(_parse("--port", "9999", "--shutdown_timeout_s", "3")) == 0
    assert "http://127.0.0.1:9999" in capsys.readouterr().out
    state = started["app"].state.cosyserve
    # uvicorn's own deadline comes after the app's, which ends streams cleanly itself
    assert state.launch_report["plan"] == "fake" and started["graceful"] == 3 + launch.SHUTDOWN_MARGIN_S
