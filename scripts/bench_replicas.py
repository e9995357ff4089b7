#!/usr/bin/env python
"""One replica vs several on this machine, in one run: the Ray Serve application deployed with
1, then 2 (``--replicas 1,2``) replicas sharing the machine's CPUs (and GPUs) equally, each
driven by ``cosyserve bench --concurrency N --url`` through Serve's proxy.

    python scripts/bench_replicas.py --synthetic --concurrency 4 --json replicas.json

Needs the ``ray`` extra. Prints a table; ``--json`` keeps every phase's report.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(
    model_dir: str, replicas: list[int], concurrency: int, max_seconds: float, text: str | None = None
) -> list[dict[str, Any]]:
    import ray
    from ray import serve

    from cosyserve.deploy.local import share_resources
    from cosyserve.deploy.options import RayServeOptions
    from cosyserve.deploy.ray_serve import build_app
    from cosyserve.tools.loadtest import run_concurrency_bench

    ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    results = []
    try:
        resources = ray.cluster_resources()
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for n in replicas:
            cpus, gpus = share_resources(n, float(resources.get("CPU", 1)), float(resources.get("GPU", 0)))
            options = RayServeOptions(
                num_replicas=n,
                num_cpus=cpus,
                num_gpus=gpus,
                metrics_interval_s=0,
                settings={"model_dir": model_dir, "max_active": concurrency, "api_key": None},
            )
            t0 = time.perf_counter()
            serve.run(build_app(options), name="bench", route_prefix="/")
            load_s = time.perf_counter() - t0
            print(
                f"{n} replica(s) ({cpus:g} CPUs, {gpus:g} GPUs each) ready in {load_s:.0f} s", file=sys.stderr
            )
            report = run_concurrency_bench(
                None,
                concurrency,
                url=f"http://127.0.0.1:{port}",
                baseline_requests=2,
                max_seconds=max_seconds,
                **({"text": text} if text else {}),
                progress=lambda message: print(f"  {message}", file=sys.stderr, flush=True),
            )
            report.update(replicas=n, cpus_per_replica=cpus, gpus_per_replica=gpus, deploy_s=round(load_s, 1))
            results.append(report)
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


def table(results: list[dict[str, Any]]) -> str:
    head = [
        "replicas",
        "CPUs each",
        f"{results[0]['concurrency']} at once: audio s/s",
        "one at a time",
        "first chunk p50 / p95 s",
        "answered by",
    ]
    rows = [head]
    for r in results:
        batched = r["non_stream"]["batched"]
        stream = r["stream"]["batched"]
        rows.append(
            [
                str(r["replicas"]),
                f"{r['cpus_per_replica']:g}",
                f"{batched['audio_s_per_wall_s']:.3f}",
                f"{r['non_stream']['one_at_a_time']['audio_s_per_wall_s']:.3f}",
                f"{stream['first_chunk_p50_s']} / {stream['first_chunk_p95_s']}",
                ", ".join(str(c) for c in (batched.get("instances") or {}).values()),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", default=None)
    parser.add_argument("--synthetic", action="store_true", help="the full-size random-weight model")
    parser.add_argument("--replicas", default="1,2", help="replica counts to compare (default 1,2)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    parser.add_argument("--text", default=None, help="the text every request reads (default: the bench's)")
    parser.add_argument("--json", default=None, help="write every report here")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.model_dir is None:
        if not args.synthetic:
            parser.error("give --model_dir DIR or --synthetic")
        from cosyserve.tools.bench import synthetic_model_dir

        args.model_dir = str(synthetic_model_dir())
    counts = [int(n) for n in args.replicas.split(",")]
    results = measure(args.model_dir, counts, args.concurrency, args.max_seconds, args.text)
    print(f"{os.cpu_count()} CPUs, model {args.model_dir}")
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
