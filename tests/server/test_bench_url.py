"""`cosyserve bench --concurrency N --url URL`: the concurrency benchmark against a server that
is already running (here a live server on the fake backend)."""

from __future__ import annotations

import json

from cosyserve.server.instance import default_instance_id


def test_bench_drives_a_running_server(app_factory, live_server, capsys) -> None:
    from cosyserve.cli import main

    server = live_server(app_factory(max_active=4))
    rc = main(["bench", "--concurrency", "3", "--url", server.url, "--baseline-requests", "2", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mode"] == "url" and report["url"] == server.url and report["tokens"] is None
    assert report["voice"] == "英文女"  # the default voice, which this server has
    batched = report["non_stream"]["batched"]
    assert batched["ok"] == batched["requests"] == 3
    assert batched["audio_s"] > 0 and report["throughput_ratio"] > 0
    assert batched["instances"] == {default_instance_id(): 3}
    assert report["non_stream"]["one_at_a_time"]["ok"] == 2
    stream = report["stream"]["batched"]
    assert stream["ok"] == 3 and 0 < stream["first_chunk_p50_s"] <= stream["first_chunk_max_s"]
    assert "warmup_s" in report


def test_bench_url_mistakes_are_clear(live_server, capsys) -> None:
    from cosyserve.cli import main

    assert main(["bench", "--url", "http://127.0.0.1:9"]) == 2
    assert "--url needs --concurrency" in capsys.readouterr().err
    assert main(["bench", "--concurrency", "2", "--url", "ftp://x"]) == 1
    assert "http(s) URL" in capsys.readouterr().err
    assert main(["bench", "--concurrency", "2", "--url", "http://127.0.0.1:9"]) == 1  # nothing listens
    assert "cannot use http://127.0.0.1:9" in capsys.readouterr().err
