"""The concurrency benchmark (`cosyserve bench --concurrency N`) on the tiny model: its report
in-process and over loopback HTTP, its flags and its limits."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from cosyserve.tools.loadtest import add_concurrency_arguments, configure_parser, run_concurrency_bench


@pytest.fixture(scope="module")
def backend(tiny_backend):
    torch.set_num_threads(1)
    return tiny_backend


def _check_phase(phase: dict, n: int) -> None:
    assert phase["requests"] == n and phase["ok"] == n and not phase["failed"]
    assert phase["wall_s"] > 0 and phase["audio_s"] > 0
    assert all(r["first_chunk_s"] is not None for r in phase["per_request"])


@pytest.mark.parametrize("http", [False, True])
def test_report_has_both_modes_and_the_ratios(backend, tmp_path, http) -> None:
    out = tmp_path / "report.json"
    report = run_concurrency_bench(
        None, concurrency=3, tokens=70, json_out=out, http=http, backend=backend, max_seconds=300
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["mode"] == ("http" if http else "in-process")
    ns, st = report["non_stream"], report["stream"]
    _check_phase(ns["batched"], 3)
    _check_phase(ns["one_at_a_time"], 3)
    _check_phase(st["batched"], 3)
    _check_phase(st["single"], 2)  # one stream alone, before and after the concurrent phase
    # Every request made exactly 70 tokens of audio: 70 tokens → int(70 * 1.7227) mel frames.
    per_request = ns["batched"]["audio_s"] / 3
    assert per_request == pytest.approx(120 * 256 / 22050, abs=1e-3)
    assert ns["one_at_a_time"]["audio_s"] == pytest.approx(ns["batched"]["audio_s"], abs=1e-3)  # 3 and 3
    assert report["baseline_requests"] == 3
    assert report["throughput_ratio"] == pytest.approx(
        ns["batched"]["audio_s_per_wall_s"] / ns["one_at_a_time"]["audio_s_per_wall_s"], rel=1e-2
    )
    for key in ("first_chunk_p50_s", "first_chunk_p95_s", "single_first_chunk_s", "first_chunk_max_ratio"):
        assert report[key] is not None and report[key] > 0
    assert report["first_chunk_p50_s"] <= report["first_chunk_p95_s"]
    # The batched phase really batched its LLM decode.
    assert ns["batched"]["batching"]["max_llm_batch"] == 3
    # The backend is left as it was found.
    assert backend.options.num_tokens is None


def test_stream_only_and_limits(backend) -> None:
    report = run_concurrency_bench(None, concurrency=2, tokens=50, stream=True, backend=backend, warmup=False)
    assert "non_stream" not in report and "stream" in report
    assert report["stream"]["batched"]["ok"] == 2
    with pytest.raises(ValueError, match="concurrency"):
        run_concurrency_bench(None, concurrency=0, backend=backend)
    with pytest.raises(ValueError, match="concurrency"):
        run_concurrency_bench(None, concurrency=65, backend=backend)


def test_a_phase_over_its_time_limit_is_cancelled_and_reported(backend) -> None:
    report = run_concurrency_bench(
        None, concurrency=2, tokens=400, stream=False, backend=backend, warmup=False, max_seconds=0.3
    )
    batched = report["non_stream"]["batched"]
    assert batched["ok"] < 2 and any("within" in e for e in batched["failed"])


def test_arguments() -> None:
    parser = argparse.ArgumentParser()
    add_concurrency_arguments(parser)
    args = parser.parse_args(["--concurrency", "8", "--http", "--max-seconds", "60", "--token-budget", "100"])
    assert (args.concurrency, args.http, args.max_seconds, args.token_budget) == (8, True, 60.0, 100)
    assert parser.parse_args([]).concurrency is None  # the bench's normal mode stays the default
    standalone = argparse.ArgumentParser()
    configure_parser(standalone)
    args = standalone.parse_args(["--model", "m", "--no-stream", "--json", "-"])
    assert args.stream is False and args.json == "-" and args.tokens == 250


def test_bench_main_with_the_bench_flags(tiny_model_dir, capsys) -> None:
    """What `cosyserve bench --concurrency N` calls, with the bench's own flags beside ours."""
    from cosyserve.tools.loadtest import bench_main

    parser = argparse.ArgumentParser()
    parser.add_argument("--model_dir")
    parser.add_argument("--tokens", type=int, default=250)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--stream_first_hop", type=int, default=30)
    add_concurrency_arguments(parser)
    args = parser.parse_args(
        ["--model_dir", str(tiny_model_dir), "--tokens", "60", "--json", "--concurrency", "2"]
        + ["--concurrency-plan", "none"]
    )
    assert bench_main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["concurrency"] == 2 and report["stream_first_hop"] == 30
    assert report["throughput_ratio"] > 0 and report["first_chunk_max_ratio"] > 0
