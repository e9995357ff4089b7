"""Schemathesis against the real app on the tiny CosyVoice model, over loopback: every
operation of /openapi.json, every check, at least 1,000 generated requests. It passes only with
zero 5xx and zero answers the schema does not describe (status codes, headers, content types,
bodies; schema-invalid input accepted; 405 and its Allow header).

What JSON Schema cannot state: whether a text has anything to speak and whether uploaded bytes
are a recording. For the operations that take either, a 400 to schema-valid input is expected
(the positive_data_acceptance check); everything else is checked as the tool defines it.
``COSYSERVE_ST_SEED`` replays another seed; ``COSYSERVE_ST_EXAMPLES`` changes the examples per
operation.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server.conftest import make_settings

pytest.importorskip("schemathesis")

REPO = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("COSYSERVE_ST_SEED", "20251205"))
EXAMPLES = int(os.environ.get("COSYSERVE_ST_EXAMPLES", "20"))
MIN_REQUESTS = 1000

CONFIG = """
hooks = "tests.server.st_hooks"

[cache]
enabled = false

[generation]
database = "none"

# The coverage phase's many schema-valid combinations would each run a synthesis; its
# schema-violating ones (every boundary, type, missing field, undeclared method) are cheap.
# Schema-valid data comes from the examples, fuzzing and stateful phases.
[phases.coverage.generation]
mode = "negative"

[[operations]]
include-path-regex = "^/(inference_|v1/audio/speech$|v1/voices$|v1/audio/voices$)"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "404", "409", "429"]
"""


def _http_statuses(app) -> dict[str, float]:
    """Requests the server answered, by status code (from its own Prometheus counter)."""
    counts: dict[str, float] = {}
    for metric in app.state.cosyserve.metrics.registry.collect():
        if metric.name != "cosyserve_http_requests":
            continue
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                status = sample.labels["status"]
                counts[status] = counts.get(status, 0) + sample.value
    return counts


@pytest.mark.timeout(600)
def test_schemathesis_finds_no_5xx_and_no_schema_mismatch(tiny_model_dir, tmp_path, live_server) -> None:
    from cosyserve.families.base import FamilyOptions
    from cosyserve.families.cosyvoice1.backend import CosyVoiceBackend
    from cosyserve.server.app import create_app

    # 8 speech tokens per segment: every synthesis is small whatever the random weights do.
    options = FamilyOptions(device="cpu", voices_dir=tmp_path / "voices", num_tokens=8)
    backend = CosyVoiceBackend.from_dir(tiny_model_dir, options)
    # Short texts keep each generated synthesis small (the limit is in the schema).
    settings = make_settings(max_text_chars=40, max_active=2, max_queue=16, decode_workers=1)
    app = create_app(settings, backend=backend, launch_report={"plan": "test"})
    server = live_server(app)
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    report = tmp_path / "report.json"
    st = shutil.which("st", path=str(Path(sys.executable).parent)) or "st"
    command = [
        st,
        "--config-file",
        str(config),
        "run",
        f"{server.url}/openapi.json",
        "--checks",
        "all",
        "--workers",
        "1",
        "--max-examples",
        str(EXAMPLES),
        "--seed",
        str(SEED),
        "--request-timeout",
        "60",
        "--continue-on-failure",
        "--no-color",
        "--report",
        "json",
        "--report-json-path",
        str(report),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_COLOR": "1"}
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    # Reproduction commands carry whole bodies (base64 recordings): keep the lines readable.
    output = "\n".join(line[:400] for line in (run.stdout + run.stderr).splitlines())
    statuses = _http_statuses(app)
    server_errors = {s: n for s, n in statuses.items() if s.startswith("5")}
    assert not server_errors, f"5xx answers: {server_errors}\n{output[-6000:]}"
    assert run.returncode == 0, output[-15000:]
    answered = sum(statuses.values())
    assert answered >= MIN_REQUESTS, f"only {answered:.0f} requests reached the server\n{output[-3000:]}"
    summary = json.loads(report.read_text()) if report.exists() else {}
    print(f"schemathesis: {answered:.0f} requests, statuses {dict(sorted(statuses.items()))}")
    assert summary, "schemathesis wrote no report"
