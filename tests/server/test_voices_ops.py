"""Saved voices, health, metrics, performance info, warmup, auth, CORS, error handling."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from cosyserve.errors import CosyserveError
from tests.server.conftest import wav_bytes
from tests.server.fakes import FakeBackend

# --- voices ----------------------------------------------------------------------------------


def test_voice_lifecycle(client, backend) -> None:
    response = client.post(
        "/v1/voices",
        data={"name": "my-voice", "transcript": "Hello world."},
        files={"audio": ("me.wav", wav_bytes(2.0), "audio/wav")},
    )
    assert response.status_code == 201, response.text
    assert response.json()["id"] == "my-voice" and response.json()["kind"] == "saved"
    assert backend.saved["my-voice"].text == "Hello world."
    assert "cosyserve-engine" in backend.threads  # added on the engine thread

    listed = client.get("/v1/voices").json()
    assert "my-voice" in listed["voices"] and "alice" in listed["voices"]
    assert client.get("/v1/voices/my-voice").json()["kind"] == "saved"
    assert "my-voice" in client.get("/list_voices").json()["saved"]

    # The saved voice is usable at once, by both APIs.
    assert client.post("/inference_sft", data={"tts_text": "Hi.", "spk_id": "my-voice"}).status_code == 200
    assert (
        client.post(
            "/v1/audio/speech", json={"model": "tts-1", "input": "Hi.", "voice": "my-voice"}
        ).status_code
        == 200
    )

    assert client.delete("/v1/voices/my-voice").json() == {
        "id": "my-voice",
        "object": "audio.voice.deleted",
        "deleted": True,
    }
    assert client.get("/v1/voices/my-voice").status_code == 404
    assert client.delete("/v1/voices/my-voice").status_code == 404


def test_voice_errors(client, backend) -> None:
    audio = {"audio": ("me.wav", wav_bytes(1.0), "audio/wav")}
    assert client.post("/v1/voices", data={"transcript": "x"}, files=audio).status_code == 400
    assert client.post("/v1/voices", data={"name": "../etc"}, files=audio).status_code == 400
    assert client.post("/v1/voices", data={"name": "ok"}).status_code == 400
    taken = client.post("/v1/voices", data={"name": "alice"}, files=audio)
    assert taken.status_code == 409 and "alice" in taken.json()["error"]["message"]
    assert client.delete("/v1/voices/alice").status_code == 409  # built-in
    bad = client.post("/v1/voices", data={"name": "x"}, files={"audio": ("x.wav", b"nope", "audio/wav")})
    assert bad.status_code == 400
    assert backend.saved == {}


def test_cloning_unsupported_backend(app_factory) -> None:
    class NoClone(FakeBackend):
        def add_voice(self, name, prompt):  # the Backend default
            from cosyserve.interfaces import Backend

            return Backend.add_voice(self, name, prompt)

    with TestClient(app_factory(NoClone())) as client:
        response = client.post(
            "/v1/voices", data={"name": "x"}, files={"audio": ("x.wav", wav_bytes(), "audio/wav")}
        )
        assert response.status_code == 400
        assert "cannot clone" in response.json()["error"]["message"]


# --- health ------------------------------------------------------------------------------


def test_health_runs_a_real_synthesis_and_caches(app_factory, backend) -> None:
    with TestClient(app_factory(health_cache_s=0.3)) as client:
        first = client.get("/health")
        assert first.status_code == 200 and first.json()["status"] == "ok"
        assert first.json()["cached"] is False
        assert len(backend.opened) == 1 and backend.opened[0].text == "Hi."
        second = client.get("/health")
        assert second.json()["cached"] is True and len(backend.opened) == 1
        time.sleep(0.35)
        assert client.get("/health").json()["cached"] is False and len(backend.opened) == 2


def test_health_503_when_synthesis_fails(app_factory) -> None:
    class Broken(FakeBackend):
        def open(self, request):
            raise RuntimeError("CUDA error: device lost")

    with TestClient(app_factory(Broken())) as client:
        response = client.get("/health")
        assert response.status_code == 503
        assert response.json()["status"] == "unhealthy" and "device lost" in response.json()["error"]


def test_health_works_with_a_full_queue(app_factory, backend) -> None:
    import threading

    with TestClient(app_factory(max_active=1, max_queue=0, request_timeout_s=1.0)) as client:
        results: dict[str, int] = {}

        def hold_the_slot() -> None:
            data = {"tts_text": "[hang]", "spk_id": "alice", "format": "wav"}
            results["hang"] = client.post("/inference_sft", data=data).status_code

        holder = threading.Thread(target=hold_the_slot)
        holder.start()
        deadline = time.monotonic() + 5
        while not backend.opened and time.monotonic() < deadline:
            time.sleep(0.01)
        busy = client.post("/inference_sft", data={"tts_text": "Hi.", "spk_id": "alice"})
        assert busy.status_code == 429 and int(busy.headers["retry-after"]) >= 1
        assert busy.json()["error"]["code"] == "queue_full"
        assert client.get("/health").status_code == 200  # probes jump the queue and need no slot
        holder.join(5)
        assert results["hang"] == 504  # the request timeout ended the stuck request


# --- metrics / performance_info / warmup --------------------------------------------------


def test_metrics_exposition(client) -> None:
    client.post("/inference_sft", data={"tts_text": "Hi. There.", "spk_id": "alice", "format": "wav"})
    client.post("/inference_sft", data={"tts_text": "Hi.", "spk_id": "nobody"})
    text = client.get("/metrics").text
    assert 'cosyserve_http_requests_total{endpoint="/inference_sft",method="POST",status="200"} 1.0' in text
    assert 'cosyserve_http_requests_total{endpoint="/inference_sft",method="POST",status="404"} 1.0' in text
    assert "cosyserve_queue_depth 0.0" in text
    assert "cosyserve_active_streams 0.0" in text
    assert "cosyserve_time_to_first_chunk_seconds_count 1.0" in text
    assert "cosyserve_rtf_count 1.0" in text
    assert 'cosyserve_synthesis_requests_total{mode="sft",state="done"} 1.0' in text
    audio = next(line for line in text.splitlines() if line.startswith("cosyserve_audio_seconds_total"))
    assert float(audio.split()[-1]) == pytest.approx(0.6)


def test_two_apps_have_separate_registries(app_factory) -> None:
    with TestClient(app_factory()) as a, TestClient(app_factory()) as b:
        a.get("/list_voices")
        assert 'endpoint="/list_voices"' in a.get("/metrics").text
        assert 'endpoint="/list_voices"' not in b.get("/metrics").text


def test_performance_info(app_factory) -> None:
    report = {"plan": "cpu-fp32-eager", "fallbacks": [{"feature": "trt", "reason": "no CUDA"}]}
    with TestClient(app_factory(launch_report=report, max_active=3)) as client:
        client.post("/inference_sft", data={"tts_text": "Hi.", "spk_id": "alice", "format": "wav"})
        info = client.get("/performance_info").json()
    assert info["backend"]["device"] == "cpu" and info["backend"]["precision"] == "fp32"
    assert info["launch"] == report
    assert info["concurrency"]["max_active"] == 3
    assert info["engine"]["completed"] == 1 and info["engine"]["audio_seconds"] > 0
    assert info["uptime_s"] >= 0 and info["settings"]["api_key"] is None
    assert info["accelerated"] == []


def test_warmup_trt(client, app_factory) -> None:
    response = client.post("/warmup_trt")
    assert response.status_code == 409 and "--load_trt" in response.json()["error"]["message"]
    backend = FakeBackend(accelerated=True)
    with TestClient(app_factory(backend)) as accelerated:
        response = accelerated.post("/warmup_trt")
        assert response.status_code == 200, response.text
        assert response.json()["warmed"] == {"flow.decoder.estimator": "tensorrt fp16"}
        assert backend.warmups == 1 and backend.threads == {"cosyserve-engine"}


# --- auth / CORS / errors -----------------------------------------------------------------


def test_api_key(app_factory) -> None:
    with TestClient(app_factory(api_key="s3cret")) as client:
        for path in ("/health", "/docs", "/openapi.json", "/"):
            assert client.get(path).status_code == 200, path
        for path in ("/list_voices", "/metrics", "/v1/models", "/performance_info"):
            response = client.get(path)
            assert response.status_code == 401, path
            assert response.headers["www-authenticate"].startswith("Bearer")
        assert client.get("/list_voices", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/list_voices", headers={"Authorization": "Basic s3cret"}).status_code == 401
        ok = client.get("/list_voices", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        error = client.get("/v1/models").json()["error"]
        assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
        assert "bearer" in client.get("/openapi.json").json()["components"]["securitySchemes"]
        assert 'status="401"' in client.get("/metrics", headers={"Authorization": "Bearer s3cret"}).text


def test_api_key_leaves_the_playground_page_public(app_factory) -> None:
    playground = pytest.importorskip("cosyserve.server.routers.playground")
    with TestClient(app_factory(api_key="s3cret")) as client:
        for path in playground.PUBLIC_PATHS:
            assert client.get(path).status_code == 200, path
        # Its API call is not public.
        encode = client.post("/playground/encode?sample_rate=16000", content=b"\0\0" * 100)
        assert encode.status_code == 401


def test_no_api_key_means_open(client) -> None:
    assert client.get("/list_voices").status_code == 200


def test_env_settings(monkeypatch, backend) -> None:
    from cosyserve.server.app import create_app
    from cosyserve.settings import Settings

    monkeypatch.setenv("COSYSERVE_API_KEY", "from-env")
    monkeypatch.setenv("COSYSERVE_MAX_TEXT_CHARS", "10")
    with TestClient(create_app(Settings(), backend=backend)) as client:
        assert client.get("/list_voices").status_code == 401
        auth = {"Authorization": "Bearer from-env"}
        response = client.post("/inference_sft", headers=auth, data={"tts_text": "x" * 11, "spk_id": "alice"})
        assert response.status_code == 400 and "10" in response.json()["error"]["message"]


def test_cors(app_factory) -> None:
    preflight = {"Access-Control-Request-Method": "POST"}
    with TestClient(app_factory()) as client:
        local = client.options("/v1/audio/speech", headers={"Origin": "http://localhost:3000", **preflight})
        assert local.headers.get("access-control-allow-origin") == "http://localhost:3000"
        remote = client.options("/v1/audio/speech", headers={"Origin": "https://evil.example", **preflight})
        assert "access-control-allow-origin" not in remote.headers
    with TestClient(app_factory(cors_origins=["https://app.example"], api_key="k")) as client:
        allowed = client.options("/v1/audio/speech", headers={"Origin": "https://app.example", **preflight})
        assert allowed.status_code == 200  # preflight is answered before auth
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"


def test_request_id_echo_and_unexpected_error(app_factory) -> None:
    class Buggy(FakeBackend):
        def check_request(self, request):
            raise KeyError("oops")

    with TestClient(app_factory(Buggy()), raise_server_exceptions=False) as client:
        response = client.post(
            "/inference_sft", data={"tts_text": "Hi.", "spk_id": "alice"}, headers={"X-Request-Id": "abc-123"}
        )
        assert response.status_code == 500
        assert response.headers["x-request-id"] == "abc-123"
        error = response.json()["error"]
        assert error["request_id"] == "abc-123" and "abc-123" in error["message"]
        assert "KeyError" not in response.text and "Traceback" not in response.text


def test_every_cosyserve_error_maps_to_its_status(app_factory) -> None:
    from cosyserve import errors

    for name in dir(errors):
        cls = getattr(errors, name)
        if not (isinstance(cls, type) and issubclass(cls, CosyserveError)):
            continue

        class Raising(FakeBackend):
            def check_request(self, request, _cls=cls):
                raise _cls("something specific")

        with TestClient(app_factory(Raising()), raise_server_exceptions=False) as client:
            response = client.post("/inference_sft", data={"tts_text": "Hi.", "spk_id": "alice"})
        assert response.status_code == cls.status_code, name
        assert response.json()["error"] == {
            **response.json()["error"],
            "code": cls.code,
            "message": "something specific",
        }
