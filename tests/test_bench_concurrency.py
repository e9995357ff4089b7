"""`cosyserve bench --concurrency N` reaches the batching benchmark and reports its ratios."""

from __future__ import annotations

import json


def test_bench_concurrency_json(tiny_model_dir, capsys) -> None:
    from cosyserve.cli import main

    rc = main(["bench", "--model_dir", str(tiny_model_dir), "--concurrency", "2", "--tokens", "30", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["concurrency"] == 2 and report["tokens"] == 30
    assert report["throughput_ratio"] > 0
    assert 0 < report["first_chunk_p50_s"] <= report["first_chunk_p95_s"]
    assert report["non_stream"]["batched"]["ok"] == 2
