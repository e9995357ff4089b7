"""`cosyserve serve --replicas 2`: a local Ray instance and two replicas behind one port, stopped
cleanly (exit 0, no Ray process left) by SIGTERM."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray.serve", reason="the ray extra is not installed")

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _processes_under(marker: str) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if marker in line]


def test_serve_replicas_runs_two_replicas_and_stops_on_sigterm(tiny_model_dir: Path, tmp_path: Path) -> None:
    ray_tmp = tempfile.mkdtemp(prefix="csrayc-", dir="/tmp")
    port = _free_port()
    env = {
        **os.environ,
        "RAY_TMPDIR": ray_tmp,  # the session directory, to find every process it started
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES": str(100 * 1024 * 1024),
        "COSYSERVE_API_KEY": "",
    }
    command = [
        sys.executable,
        "-m",
        "cosyserve.cli",
        "serve",
        "--replicas",
        "2",
        "--model_dir",
        str(tiny_model_dir),
        "--force_config",
        "eager",
        "--voices_dir",
        str(tmp_path / "voices"),
        "--shutdown_timeout_s",
        "3",
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "replicas ready behind" in line:
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(240), "not ready within 240 s:\n" + "".join(lines[-40:])
        url = f"http://127.0.0.1:{port}"
        assert f"2 replicas ready behind http://127.0.0.1:{port}" in "".join(lines)
        body = {"tts_text": "Hello there.", "spk_id": "英文女", "format": "wav"}
        instances: set[str] = set()
        with httpx.Client(base_url=url, timeout=120) as client, ThreadPoolExecutor(6) as pool:
            for _ in range(5):
                responses = list(pool.map(lambda _: client.post("/inference_sft", data=body), range(6)))
                assert all(r.status_code == 200 for r in responses), [r.text[:200] for r in responses]
                instances |= {r.headers["x-cosyserve-instance"] for r in responses}
                if len(instances) == 2:
                    break
        assert len(instances) == 2, instances

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0, "".join(lines[-40:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        deadline = time.monotonic() + 30
        while _processes_under(ray_tmp) and time.monotonic() < deadline:
            time.sleep(0.5)
        leaked = _processes_under(ray_tmp)
        for pid in leaked:  # started by this test (they name its session directory)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not leaked, f"processes left behind: {leaked}"
