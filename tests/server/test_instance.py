"""`X-Cosyserve-Instance`: every response names the server process that answered, and
`/performance_info` shows the same id, so replicas behind one endpoint can be told apart."""

from __future__ import annotations

import os
import socket

import httpx
import pytest
from fastapi.testclient import TestClient

from cosyserve.server.instance import default_instance_id
from tests.server.conftest import make_settings

HEADER = "x-cosyserve-instance"


def test_default_id_names_the_process_and_host() -> None:
    assert default_instance_id() == f"{os.getpid()}@{socket.gethostname()}"


def test_every_response_carries_the_instance(app_factory) -> None:
    with TestClient(
        app_factory(api_key="k", instance_id="replica-a@node1"), raise_server_exceptions=False
    ) as c:
        auth = {"Authorization": "Bearer k"}
        responses = {
            "ok": c.post(
                "/inference_sft", headers=auth, data={"tts_text": "Hi.", "spk_id": "alice", "format": "wav"}
            ),
            "open path": c.get("/health"),
            "unauthorized": c.get("/list_voices"),
            "unknown voice": c.post(
                "/inference_sft", headers=auth, data={"tts_text": "Hi.", "spk_id": "nobody"}
            ),
            "no route": c.get("/nowhere", headers=auth),
            "too large": c.post(
                "/inference_sft", headers={**auth, "Content-Length": str(2**31)}, content=b""
            ),
            "preflight": c.options(
                "/v1/audio/speech",
                headers={"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"},
            ),
        }
        info = c.get("/performance_info", headers=auth).json()
    statuses = {name: r.status_code for name, r in responses.items()}
    assert statuses == {
        "ok": 200,
        "open path": 200,
        "unauthorized": 401,
        "unknown voice": 404,
        "no route": 404,
        "too large": 413,
        "preflight": 200,
    }
    assert {name: r.headers.get(HEADER) for name, r in responses.items()} == dict.fromkeys(
        responses, "replica-a@node1"
    )
    assert info["instance"] == "replica-a@node1"


def test_browsers_may_read_the_header(app_factory) -> None:
    with TestClient(app_factory()) as c:
        r = c.get("/list_voices", headers={"Origin": "http://localhost:3000"})
    assert HEADER in r.headers["access-control-expose-headers"].lower()


def test_streamed_responses_carry_it_and_the_default_is_per_process(app_factory, live_server) -> None:
    server = live_server(app_factory())
    with httpx.stream(
        "POST", f"{server.url}/inference_sft", data={"tts_text": "Hi. There.", "spk_id": "alice"}, timeout=30
    ) as r:
        assert r.status_code == 200 and r.headers.get("transfer-encoding") == "chunked"
        assert r.headers[HEADER] == default_instance_id()
        assert sum(len(b) for b in r.iter_bytes()) > 0
    assert httpx.get(f"{server.url}/performance_info").json()["instance"] == default_instance_id()


@pytest.mark.parametrize("bad", ["has space", "new\nline", "x" * 129, "é"])
def test_instance_id_must_be_a_safe_header_value(bad: str) -> None:
    with pytest.raises(ValueError, match="instance_id"):
        make_settings(instance_id=bad)
