"""The Grafana dashboard in deploy/grafana: generated from cosyserve.deploy.grafana, and every
series it queries is one the server really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cosyserve.deploy.grafana import dashboard

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "cosyserve-dashboard.json"
NAME = re.compile(r'\(ray_\)\?cosyserve_(\w+)"')


def queried_cosyserve_series(board: dict) -> set[str]:
    return {
        f"cosyserve_{name}"
        for panel in board["panels"]
        for target in panel.get("targets", [])
        for name in NAME.findall(target["expr"])
    }


def test_the_committed_dashboard_is_the_generated_one() -> None:
    assert json.loads(DASHBOARD.read_text(encoding="utf-8")) == dashboard(), (
        "regenerate it: python -m cosyserve.deploy.grafana > deploy/grafana/cosyserve-dashboard.json"
    )


def test_panels_are_well_formed() -> None:
    board = dashboard()
    assert board["uid"] == "cosyserve"
    assert [v["name"] for v in board["templating"]["list"]] == ["datasource"]
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len(panels) >= 12
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
            if "cosyserve_" in expr:  # one line per server or replica
                assert "{{instance}}" in target["legendFormat"] and "instance" in expr, panel["title"]
                assert '"instance", "$1", "cosyserve_instance"' in expr


@pytest.fixture(scope="module")
def exposition(tiny_backend) -> str:
    from fastapi.testclient import TestClient

    from cosyserve.server.app import create_app
    from cosyserve.settings import Settings

    backend = tiny_backend
    settings = Settings(api_key=None, cors_origins=[])
    with TestClient(create_app(settings, backend=backend, launch_report={"plan": "test"})) as client:
        assert client.post(
            "/inference_sft", data={"tts_text": "Hi.", "spk_id": "英文女", "format": "wav"}
        ).is_success
        return client.get("/metrics").text


def test_every_queried_series_is_exported(exposition: str) -> None:
    exported = {
        line.split("{")[0].split(" ")[0] for line in exposition.splitlines() if not line.startswith("#")
    }
    queried = queried_cosyserve_series(dashboard())
    assert {"cosyserve_time_to_first_chunk_seconds_bucket", "cosyserve_llm_batch_size_sum"} <= queried
    assert queried <= exported, (
        f"the dashboard queries series the server does not export: {queried - exported}"
    )
