"""`cosyserve bench`: RTF, time to first chunk and per-stage times, per acceleration configuration.

Each configuration runs in its own subprocess (so peak RSS figures do not mix and one plan's
thread/allocator state cannot help or hurt the next), warms up, then times ``--runs`` syntheses of
one segment with exactly ``--tokens`` speech tokens (EOS masked, generation capped). The eager
configuration is always measured in the same invocation, so every figure also shows as a ratio.

Per run: one non-streaming synthesis (LLM tokens/s, flow s, vocoder s, RTF) and, unless
``--no-stream``, one streaming synthesis with the server's first hop (time to first chunk).
Figures are medians over the runs.
``--synthetic`` writes a full-size random-weight model directory (``--family``: the
CosyVoice-300M-SFT, CosyVoice2-0.5B or Fun-CosyVoice3-0.5B architecture) into the cache once and
benchmarks that.

RTF bands (the seed's): < 0.3 very fast, 0.3-0.7 fast, 0.7-1.0 acceptable, > 1.0 slow.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from cosyserve.settings import LOW_LATENCY_FIRST_HOP

logger = logging.getLogger(__name__)

BENCH_TEXT = "Hello, this is a benchmark of the CosyVoice inference server running on this machine."
RESULT_PREFIX = "COSYSERVE_BENCH_RESULT "
BENCH_AUDIO_S = 5  # --tokens default: this many seconds of audio at the family's token rate
ASSETS = Path(__file__).resolve().parent.parent / "assets"


@dataclass(frozen=True)
class SyntheticModel:
    """A family's full-size architecture, benchmarked with random weights (``--synthetic``)."""

    name: str  # the directory written in the cache
    config: str  # the yaml, in cosyserve/assets (CosyVoice2/3: the backbone's config.json beside it)
    speakers: int | None = None  # built-in speakers (None: as the published directory has)


SYNTHETIC = {
    "cosyvoice1": SyntheticModel("CosyVoice-300M-SFT-random-seed0", "cosyvoice-300m-sft.yaml"),
    "cosyvoice2": SyntheticModel("CosyVoice2-0.5B-random-seed0", "cosyvoice2-0.5b/cosyvoice2.yaml"),
    # One built-in speaker (the published directory has none): the reference's figures were taken
    # without a prompt, so the bench speaks without one too (an SFT speaker: the embedding only).
    "cosyvoice3": SyntheticModel(
        "Fun-CosyVoice3-0.5B-random-seed0-spk1", "cosyvoice3-0.5b/cosyvoice3.yaml", speakers=1
    ),
}
SYNTHETIC_DONE = ".cosyserve-bench-complete"  # written last: a half-written directory is redone


def rtf_band(rtf: float | None) -> str:
    if rtf is None:
        return "-"
    if rtf < 0.3:
        return "very fast"
    if rtf < 0.7:
        return "fast"
    if rtf <= 1.0:
        return "acceptable"
    return "slow"


# ------------------------------------------------------------------------------------ model dir


def full_size_yaml(family: str = "cosyvoice1") -> Path:
    """The family's full-size config, shipped with the package (architecture only, no weights)."""
    return ASSETS / SYNTHETIC[family].config


def synthetic_model_dir(cache: Path | None = None, family: str = "cosyvoice1") -> Path:
    """The family's full-size random-weight model directory, written on first use (1.7-2.5 GB)."""
    from cosyserve.acceleration.onnx_export import cache_root
    from cosyserve.tools.make_model import make_model

    spec = SYNTHETIC[family]
    out = (cache or cache_root() / "bench") / spec.name
    if (out / SYNTHETIC_DONE).is_file():
        return out
    print(f"writing a full-size random-weight model to {out} (once) ...", file=sys.stderr, flush=True)
    make_model(full_size_yaml(family), out, seed=0, overwrite=True, speakers=spec.speakers)
    (out / SYNTHETIC_DONE).write_text("written by cosyserve bench --synthetic\n")
    return out


def default_tokens(model_dir: str) -> int:
    """``BENCH_AUDIO_S`` of audio at the directory's family's speech-token rate."""
    from cosyserve import families

    return BENCH_AUDIO_S * families.detect(model_dir).speech_token_hz


# ------------------------------------------------------------------------------------ configurations


def available_configs(test_all: bool, settings: Any = None) -> tuple[list[str], str]:
    """Configurations to measure (eager first) and why."""
    from cosyserve.acceleration.apply import preflight
    from cosyserve.acceleration.launcher import PLANS, detect_hardware, plan_chain

    hw = detect_hardware()
    if test_all:
        names = []
        for name, plan in PLANS.items():
            try:
                preflight(plan)
                names.append(name)
            except Exception as exc:  # noqa: BLE001 - any reason a plan cannot run here
                logger.info("skipping %s: %s", name, exc)
        why = "every configuration this machine supports"
    else:
        chain, why = plan_chain(hw, settings or SimpleNamespace(auto=True, force_config=None))
        names = [chain[0].name]
    ordered = ["eager"] + [n for n in names if n != "eager"]
    return ordered, why


# ------------------------------------------------------------------------------------ worker


@dataclass
class StageTimer:
    """Times a backend's flow and vocoder calls inside a synthesis (wrapping their entry points;
    nested calls of one stage, e.g. inference -> prepare, count once)."""

    seconds: dict[str, float] = field(default_factory=dict)
    _depth: dict[str, int] = field(default_factory=dict)

    def wrap(self, owner: Any, attr: str, stage: str) -> None:
        original = getattr(owner, attr)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            depth = self._depth.get(stage, 0)
            self._depth[stage] = depth + 1
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self._depth[stage] = depth
                if depth == 0:
                    self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0

        object.__setattr__(owner, attr, timed)

    def reset(self) -> None:
        self.seconds.clear()


def _proc_status_mb(field: str) -> float | None:
    """A memory figure of this process from ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return None


def _peak_rss_mb() -> float:
    """This process's peak RSS: the kernel's high-water mark of its own memory map (VmHWM).

    Not ``ru_maxrss``: Linux carries that across exec from the forked parent's map, so a worker
    started by a parent that had just built a 2 GB synthetic model would report the parent's peak."""
    peak = _proc_status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_rss_mb() -> float | None:
    return _proc_status_mb("VmRSS")


def bench_request(backend: Any) -> Any:
    """What every run synthesises: ``BENCH_TEXT`` in a built-in voice (英文女 where there is one),
    else in whatever voice the backend's own warm-up uses (a saved voice or a prompt recording)."""
    from cosyserve.api import SynthesisRequest

    if "英文女" in backend.speakers:
        request = SynthesisRequest(text=BENCH_TEXT, voice="英文女")
    else:
        request = dataclasses.replace(backend.warmup_request(), text=BENCH_TEXT)
    return dataclasses.replace(request, enable_smart_split=False)


def _synthesize(
    backend: Any, template: Any, stream: bool, seed: int, tokens: int | None
) -> tuple[float, float, float | None, Any]:
    """(audio seconds, wall seconds, first chunk seconds, info) of one synthesis."""
    from cosyserve.engine.batching import run_alone

    request = dataclasses.replace(template, stream=stream, seed=seed)
    t0 = time.perf_counter()
    # num_tokens: exactly N tokens per segment (EOS masked, generation capped at N).
    job = backend.open(request, num_tokens=tokens) if tokens else backend.open(request)
    first = None
    samples = 0
    for chunk in run_alone(job):
        if chunk is not None and len(chunk.audio):
            if first is None:
                first = time.perf_counter() - t0
            samples += len(chunk.audio)
    wall = time.perf_counter() - t0
    return samples / backend.sample_rate, wall, first, job.info


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Measure one configuration in this process; returns the result record."""
    import torch

    from cosyserve.acceleration.launcher import PLANS, build_backend, open_family, warm_up

    name = args.config[-1] if isinstance(args.config, list) else args.config
    plan = PLANS[name]
    settings = SimpleNamespace(voices_dir=None, stream_first_hop=args.stream_first_hop)
    t0 = time.perf_counter()
    backend = build_backend(open_family(args.model_dir), str(args.model_dir), plan, settings)
    warm_up(backend)  # the server's start-up check: one short synthesis before serving
    load_s = time.perf_counter() - t0
    rss_loaded = _peak_rss_mb()
    model = backend.model
    tokens = int(args.tokens) if args.tokens else None
    timer = StageTimer()
    for attr in ("inference", "prepare", "decode"):
        if hasattr(model.flow, attr):
            timer.wrap(model.flow, attr, "flow")
    timer.wrap(model.hift, "inference", "vocoder")
    request = bench_request(backend)

    # Warm-up: the VM runs a fresh process several times slower for its first minute, and
    # allocators/ORT arenas settle on the first calls: synthesise until warm_up_s has passed.
    t_warm = time.perf_counter()
    warm_runs = 0
    while warm_runs < 1 or time.perf_counter() - t_warm < args.warmup_s:
        _synthesize(backend, request, bool(args.stream), warm_runs, tokens)
        warm_runs += 1
    warm_s = time.perf_counter() - t_warm

    runs: list[dict[str, Any]] = []
    for i in range(args.runs):
        timer.reset()
        audio_s, wall, _, info = _synthesize(backend, request, False, 100 + i, tokens)
        llm_s = info.stage_seconds.get("llm", 0.0)
        run = {
            "audio_s": audio_s,
            "wall_s": wall,
            "tokens": info.speech_tokens,
            "llm_s": llm_s,
            "llm_tokens_per_s": info.speech_tokens / llm_s if llm_s > 0 else None,
            "flow_s": timer.seconds.get("flow", 0.0),
            "vocoder_s": timer.seconds.get("vocoder", 0.0),
            "rtf": wall / audio_s if audio_s > 0 else None,
        }
        if args.stream:
            s_audio, s_wall, first, _ = _synthesize(backend, request, True, 100 + i, tokens)
            run.update(first_chunk_s=first, stream_rtf=s_wall / s_audio if s_audio > 0 else None)
        runs.append(run)
        logger.info(
            "%s run %d: %s",
            name,
            i + 1,
            {k: round(v, 3) if isinstance(v, float) else v for k, v in run.items()},
        )

    def med(key: str) -> float | None:
        values = [r[key] for r in runs if r.get(key) is not None]
        return round(statistics.median(values), 4) if values else None

    result: dict[str, Any] = {
        "config": name,
        "audio_s": med("audio_s"),
        "tokens": int(med("tokens") or 0),
        "llm_tokens_per_s": med("llm_tokens_per_s"),
        "llm_s": med("llm_s"),
        "flow_s": med("flow_s"),
        "vocoder_s": med("vocoder_s"),
        "rtf": med("rtf"),
        "rtf_band": rtf_band(med("rtf")),
        "first_chunk_s": med("first_chunk_s"),
        "stream_rtf": med("stream_rtf"),
        "stream_first_hop": args.stream_first_hop,
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "rss_mb": round(_current_rss_mb() or 0.0, 1),  # steady state, after the timed runs
        "rss_after_load_mb": round(rss_loaded, 1),
        "load_s": round(load_s, 2),
        "warmup_s": round(warm_s, 1),
        "runs": len(runs),
        "device": str(backend.device),
        "torch_threads": torch.get_num_threads(),
        "accelerations": backend.options.extra.get("accelerations", []),
        "per_run": runs,
    }
    if plan.int8 and args.int8_deviation and backend.family == "cosyvoice1" and request.voice:
        # After the peak RSS was taken: this loads a second, FP32 copy of the LLM.
        result["int8_deviation"] = int8_report(backend, str(args.model_dir), request.voice)
    return result


def int8_report(backend: Any, model_dir: str, voice: str, steps: int = 50) -> dict[str, Any]:
    """Deviation of the int8 configuration from FP32.

    * LLM: log-probs of the int8 LLM vs a fresh FP32 copy, teacher-forced on the FP32 tokens, and
      how often seeded sampling picks the same token;
    * flow: mel from the int8 estimator vs the FP32 eager flow, same tokens and same noise;
    * pipeline: mel from each model's own seeded tokens (differs wherever the tokens differ).
    """
    import torch

    from cosyserve.acceleration.quant import llm_deviation

    text_ids = torch.tensor([backend.text.tokenize(BENCH_TEXT)])
    embedding = backend.speakers[voice]
    fp32_llm = _load_fp32(model_dir, backend.config, "llm")
    int8 = backend.model.llm
    report: dict[str, Any] = {
        "llm": llm_deviation(fp32_llm, int8, text_ids, embedding, steps=steps).as_dict()
    }
    with torch.inference_mode():
        tok_a = torch.tensor(
            [list(fp32_llm.generate(text_ids, embedding=embedding, generator=7, num_tokens=steps))]
        )
        tok_b = torch.tensor(
            [list(int8.generate(text_ids, embedding=embedding, generator=7, num_tokens=steps))]
        )
        del fp32_llm
        fp32_flow = _load_fp32(model_dir, backend.config, "flow")
        flow = backend.model.flow

        def mel(f: Any, tokens: Any) -> Any:
            return f.inference(tokens, embedding=embedding, generator=torch.Generator().manual_seed(1))[0]

        ref = mel(fp32_flow, tok_a)
        same_tokens = mel(flow, tok_a)
        own_tokens = mel(flow, tok_b)

    def rel(a: Any, b: Any) -> float:
        return round(float((a - b).norm() / b.norm().clamp_min(1e-9)), 6)

    report["flow"] = {
        "mel_rel_l2": rel(same_tokens, ref),
        "mel_max_abs": round(float((same_tokens - ref).abs().max()), 6),
    }
    report["pipeline"] = {
        "mel_rel_l2": rel(own_tokens, ref),
        "tokens_identical": bool(torch.equal(tok_a, tok_b)),
    }
    return report


def _load_fp32(model_dir: str, config: Any, name: str) -> Any:
    from cosyserve.families.cosyvoice1.loader import find_model_files, load_network

    return load_network(name, find_model_files(model_dir), config)


# ------------------------------------------------------------------------------------ parent


def _worker_command(args: argparse.Namespace, config: str) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "cosyserve.cli",
        "--log-level",
        args.worker_log_level,
        "bench",
        "--_worker",
        "--model_dir",
        str(args.model_dir),
        "--config",
        config,
        "--runs",
        str(args.runs),
        "--warmup_s",
        str(args.warmup_s),
    ]
    if args.tokens:
        cmd += ["--tokens", str(args.tokens)]
    cmd.append("--stream" if args.stream else "--no-stream")
    if args.stream_first_hop:
        cmd += ["--stream_first_hop", str(args.stream_first_hop)]
    if not args.int8_deviation:
        cmd.append("--no-int8_deviation")
    return cmd


def measure(args: argparse.Namespace, config: str) -> dict[str, Any]:
    if args.in_process:
        worker_args = argparse.Namespace(**{**vars(args), "config": config})
        try:
            return run_worker(worker_args)
        except Exception as exc:  # noqa: BLE001 - report the configuration as failed
            return {"config": config, "error": f"{type(exc).__name__}: {exc}"}
    proc = subprocess.run(_worker_command(args, config), capture_output=True, text=True, check=False)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"config": config, "error": f"worker exited {proc.returncode}: {' | '.join(tail)}"}


RATIO_KEYS = ("llm_tokens_per_s", "flow_s", "vocoder_s", "rtf", "first_chunk_s", "peak_rss_mb")


def add_ratios(results: list[dict[str, Any]]) -> None:
    """`vs_eager[key]`: speed-up over eager (>1 is better) for times and RSS, ratio for tokens/s."""
    base = next((r for r in results if r.get("config") == "eager" and "error" not in r), None)
    for r in results:
        if base is None or "error" in r:
            continue
        ratios = {}
        for key in RATIO_KEYS:
            a, b = r.get(key), base.get(key)
            if not a or not b:
                continue
            ratios[key] = round(a / b if key == "llm_tokens_per_s" else b / a, 3)
        r["vs_eager"] = ratios


def _fmt(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(results: list[dict[str, Any]]) -> str:
    head = [
        "config",
        "audio s",
        "LLM tok/s",
        "flow s",
        "vocoder s",
        "RTF",
        "band",
        "first chunk s",
        "peak RSS MB",
    ]
    rows = [head]
    for r in results:
        if "error" in r:
            rows.append([r["config"], "error: " + r["error"][:80]] + [""] * (len(head) - 2))
            continue
        ratio = r.get("vs_eager", {})

        def cell(key: str, digits: int = 2, r: dict[str, Any] = r, ratio: dict[str, Any] = ratio) -> str:
            text = _fmt(r.get(key), digits)
            if key in ratio and r["config"] != "eager":
                text += f" ({ratio[key]:.2f}x)"
            return text

        rows.append(
            [
                r["config"],
                _fmt(r.get("audio_s")),
                cell("llm_tokens_per_s", 1),
                cell("flow_s"),
                cell("vocoder_s"),
                cell("rtf"),
                r.get("rtf_band", "-"),
                cell("first_chunk_s"),
                cell("peak_rss_mb", 0),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    note = "(x) = speed-up over eager measured in this run (tokens/s: ratio; RSS: eager/config)"
    return "\n".join(lines + ["", note])


# ------------------------------------------------------------------------------------ CLI


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model_dir", "--model-dir", default=None, help="CosyVoice v1 model directory")
    parser.add_argument(
        "--synthetic",
        action="store_true",
        help="benchmark a full-size random-weight model (written to the cache once)",
    )
    parser.add_argument(
        "--test_all",
        "--test-all",
        action="store_true",
        help="every configuration this machine supports (default: the one --auto picks)",
    )
    parser.add_argument("--config", action="append", default=None, help="measure this plan (repeatable)")
    parser.add_argument("--json", action="store_true", help="print a JSON list, one object per configuration")
    parser.add_argument(
        "--family",
        choices=sorted(SYNTHETIC),
        default=None,
        help="with --synthetic: which full-size architecture (default cosyvoice1 = CosyVoice-300M-SFT)",
    )
    parser.add_argument(
        "--tokens",
        type=int,
        default=None,
        help=f"force exactly N speech tokens (default {BENCH_AUDIO_S} s of audio: 250 for CosyVoice, 125 for 2 and 3)",
    )
    parser.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure streaming: time to the first chunk (default on; --no-stream skips it)",
    )
    parser.add_argument(
        "--stream_first_hop",
        "--stream-first-hop",
        type=int,
        default=LOW_LATENCY_FIRST_HOP,
        help=f"tokens in a stream's first hop (default {LOW_LATENCY_FIRST_HOP}, the server's; 100 = upstream)",
    )
    parser.add_argument("--runs", type=int, default=3, help="timed runs per configuration (default 3)")
    parser.add_argument(
        "--warmup_s",
        "--warmup-s",
        type=float,
        default=30.0,
        help="minimum warm-up seconds per configuration before timing (default 30)",
    )
    parser.add_argument(
        "--int8_deviation",
        "--int8-deviation",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="for int8 configurations, measure the deviation from FP32 (default on)",
    )
    parser.add_argument(
        "--in_process",
        "--in-process",
        action="store_true",
        help="measure in this process (faster; peak RSS then mixes across configurations)",
    )
    parser.add_argument("--worker_log_level", default="WARNING", help=argparse.SUPPRESS)
    parser.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    from cosyserve.tools.loadtest import add_concurrency_arguments

    add_concurrency_arguments(parser)  # --concurrency N [--http | --url URL]: batched vs one at a time
    from cosyserve.tools.realtime_bench import add_arguments as add_realtime_arguments

    add_realtime_arguments(parser)  # --realtime: text streamed in over the WebSocket


def main(args: argparse.Namespace) -> int:
    from cosyserve.errors import CosyserveError

    if args._worker:
        result = run_worker(args)
        print(RESULT_PREFIX + json.dumps(result, ensure_ascii=False), flush=True)
        return 0
    if args.realtime:
        from cosyserve.tools.realtime_bench import realtime_main

        return realtime_main(args)
    if args.url and not args.concurrency:
        print("cosyserve bench: --url needs --concurrency N or --realtime", file=sys.stderr)
        return 2
    try:
        if getattr(args, "soak", None) or (args.concurrency and getattr(args, "url", None)):
            from cosyserve.tools.loadtest import bench_main

            return bench_main(args)  # a running server: nothing to load here
        if args.model_dir is None:
            if not args.synthetic:
                print(
                    "cosyserve bench: give --model_dir DIR, or --synthetic for a random-weight full-size model",
                    file=sys.stderr,
                )
                return 2
            args.model_dir = str(synthetic_model_dir(family=args.family or "cosyvoice1"))
        elif args.family:
            print(
                "cosyserve bench: --family picks the --synthetic model; a --model_dir says its own",
                file=sys.stderr,
            )
            return 2
        from cosyserve.hub import resolve_model_dir

        args.model_dir = str(resolve_model_dir(args.model_dir))
        if args.tokens is None:
            args.tokens = default_tokens(args.model_dir)
        if args.concurrency:
            from cosyserve.tools.loadtest import bench_main

            return bench_main(args)
        if args.config:
            from cosyserve.acceleration.launcher import PLANS

            unknown = [c for c in args.config if c not in PLANS]
            if unknown:
                print(
                    f"cosyserve bench: unknown --config {', '.join(unknown)}; choose from {', '.join(PLANS)}",
                    file=sys.stderr,
                )
                return 2
            configs = ["eager"] + [c for c in args.config if c != "eager"]
            why = "chosen with --config"
        else:
            configs, why = available_configs(args.test_all)
    except CosyserveError as exc:
        print(f"cosyserve bench: {exc.message}", file=sys.stderr)
        return 1
    print(
        f"benchmarking {args.model_dir}: {', '.join(configs)} ({why}); {args.tokens} tokens, "
        f"{args.runs} runs, warm-up {args.warmup_s:.0f} s each",
        file=sys.stderr,
        flush=True,
    )
    results = []
    for config in configs:
        t0 = time.perf_counter()
        print(f"  {config} ...", file=sys.stderr, flush=True)
        result = measure(args, config)
        status = result.get("error") or f"RTF {result.get('rtf')}"
        print(f"  {config}: {status} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        results.append(result)
    add_ratios(results)
    if args.json:
        print(json.dumps(results, ensure_ascii=False, indent=2))
    else:
        print(format_table(results))
        for r in results:
            if "int8_deviation" in r:
                print(f"\nint8 deviation from FP32 ({r['config']}): {json.dumps(r['int8_deviation'])}")
    return 0 if all("error" not in r for r in results) else 1
