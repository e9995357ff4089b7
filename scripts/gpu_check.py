"""One prepared GPU measurement (run on a lent CUDA machine, see README "Development").

Generates a full-size random-weight CosyVoice-300M-SFT directory, then measures on the GPU, in
one process: LLM decode tokens/s (eager FP32, FP16; batch 1 and batch 16), the flow for 250
tokens (eager FP32, FP16 with a NaN/silence check, torch.compile'd estimator), HiFT, and 16
requests batched vs one at a time. Prints one JSON object. Needs only torch, numpy, pyyaml, onnx.

``--family cosyvoice2|cosyvoice3`` measures the issues' GPU targets for a later family instead,
through the serving path (the launcher's plans, the engine's batching): for ``cuda_eager`` and
``jit_fp16``, the first streamed chunk and RTF of one request and the aggregate throughput of 16
concurrent requests against one at a time (``cosyserve bench --concurrency``'s phases).

    PYTHONPATH=. python3 scripts/gpu_check.py [--family F] [--out results.json] [--deadline 420]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cosyserve.families.cosyvoice1.loader import load_model_directory  # noqa: E402
from cosyserve.families.cosyvoice1.token2wav import token2wav  # noqa: E402
from cosyserve.tools.make_model import make_model  # noqa: E402

FULL_YAML = ROOT / "cosyserve" / "assets" / "cosyvoice-300m-sft.yaml"
TOKENS = 250


DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeat: int = 3) -> float:
    fn()  # warm-up
    sync()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def llm_decode_tps(llm, emb, batch: int, steps: int | None = None) -> float:
    """Aggregate tokens/s of `steps` greedy decode steps for `batch` rows (sampling excluded)."""
    steps = steps or TOKENS
    text = torch.randint(0, 50000, (1, 25), device=DEVICE)
    prefix = llm.build_prefix(text, embedding=emb)

    def run() -> None:
        cache = llm.new_cache(batch, capacity=prefix.shape[1] + steps + 1)
        logp = llm.log_probs(llm.prefill_hidden(prefix.expand(batch, -1, -1).contiguous(), cache))
        for _ in range(steps):
            tokens = logp[:, :4096].argmax(-1)
            logp = llm.decode_step(tokens, cache)

    with torch.inference_mode():
        return batch * steps / timed(run, repeat=2)


def main() -> int:
    global DEVICE, TOKENS
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script itself")
    parser.add_argument("--yaml", default=None, help="the architecture (default: the family's full size)")
    parser.add_argument(
        "--deadline", type=float, default=420.0, help="skip remaining parts after this many s"
    )
    parser.add_argument(
        "--tokens",
        type=int,
        default=None,
        help="speech tokens per run (default 5 s of audio; dry run: fewer)",
    )
    parser.add_argument("--family", default="cosyvoice1", choices=("cosyvoice1", "cosyvoice2", "cosyvoice3"))
    parser.add_argument("--concurrency", type=int, default=16, help="--family: concurrent requests")
    args = parser.parse_args()
    DEVICE = args.device
    TOKENS = args.tokens or (TOKENS if args.family == "cosyvoice1" else 125)
    start = time.perf_counter()
    torch.backends.cuda.matmul.allow_tf32 = False  # FP32 parity (TF32 convolutions break it)
    torch.backends.cudnn.allow_tf32 = False
    res: dict = {
        "device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu",
        "torch": torch.__version__,
    }

    def left() -> float:
        return args.deadline - (time.perf_counter() - start)

    if args.family != "cosyvoice1":
        family_check(args.family, args.yaml, args.concurrency, res, left)
        return _report(res, start, args.out)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        make_model(Path(args.yaml or FULL_YAML), Path(tmp) / "m", seed=0)
        res["make_model_s"] = round(time.perf_counter() - t0, 1)
        model = load_model_directory(Path(tmp) / "m", device=DEVICE)
    llm, flow, hift = model.llm, model.flow, model.hift
    emb = model.speakers["中文女"].to(DEVICE)
    tokens = torch.randint(0, 4096, (1, TOKENS), device=DEVICE)
    gen = torch.Generator(device="cpu").manual_seed(0)

    with torch.inference_mode():
        res["llm_fp32_b1_tok_s"] = round(llm_decode_tps(llm, emb, 1), 1)
        res["llm_fp32_b16_tok_s"] = round(llm_decode_tps(llm, emb, 16), 1)
        res["flow_fp32_s"] = round(timed(lambda: flow.inference(tokens, embedding=emb, generator=gen)), 4)
        mel, _ = flow.inference(tokens, embedding=emb, generator=gen)
        res["hift_fp32_s"] = round(timed(lambda: hift.inference(mel, generator=gen)), 4)
        res["token2wav_fp32_s"] = round(
            timed(lambda: token2wav(flow, hift, tokens, embedding=emb, generator=gen)), 4
        )
        # 16 requests: one batched Euler loop vs 16 separate flow calls.
        items = [flow.prepare(tokens, None, None, emb, None, None, gen) for _ in range(16)]
        res["flow16_serial_s"] = round(timed(lambda: [flow.decode([it]) for it in items], repeat=1), 4)
        res["flow16_batched_s"] = round(timed(lambda: flow.decode(items), repeat=1), 4)
        res["flow16_speedup"] = round(res["flow16_serial_s"] / res["flow16_batched_s"], 2)
        res["llm16_speedup"] = round(res["llm_fp32_b16_tok_s"] / res["llm_fp32_b1_tok_s"], 2)

        # FP16: LLM and flow in half precision, HiFT stays FP32; guard against NaN / silence.
        if DEVICE == "cpu":  # half-precision matmuls are not the point of a CPU dry run
            return _report(res, start, args.out)
        llm.half()
        flow.half()
        emb16 = emb.half()
        res["llm_fp16_b1_tok_s"] = round(llm_decode_tps(llm, emb16, 1), 1)
        res["llm_fp16_b16_tok_s"] = round(llm_decode_tps(llm, emb16, 16), 1)
        res["flow_fp16_s"] = round(timed(lambda: flow.inference(tokens, embedding=emb16, generator=gen)), 4)
        mel16, _ = flow.inference(tokens, embedding=emb16, generator=gen)
        res["flow_fp16_finite"] = bool(torch.isfinite(mel16).all())
        res["flow_fp16_vs_fp32_max_abs"] = float((mel16.float() - mel).abs().max())
        flow.float()
        llm.float()

    if left() > 90:
        estimator = flow.decoder.estimator
        compiled = torch.compile(estimator, dynamic=False)
        flow.decoder.estimator_runner = compiled
        with torch.inference_mode():
            t0 = time.perf_counter()
            flow.inference(tokens, embedding=emb, generator=gen)
            sync()
            res["compile_first_call_s"] = round(time.perf_counter() - t0, 1)
            res["flow_compiled_s"] = round(
                timed(lambda: flow.inference(tokens, embedding=emb, generator=gen)), 4
            )
            mel_c, _ = flow.inference(tokens, embedding=emb, generator=torch.Generator().manual_seed(1))
            mel_e_gen = torch.Generator().manual_seed(1)
            flow.decoder.estimator_runner = None
            mel_e, _ = flow.inference(tokens, embedding=emb, generator=mel_e_gen)
            res["flow_compiled_vs_eager_max_abs"] = float((mel_c - mel_e).abs().max())
    else:
        res["compile_skipped"] = f"only {left():.0f} s left"
    return _report(res, start, args.out)


def family_check(family: str, yaml: str | None, concurrency: int, res: dict, left) -> None:  # noqa: ANN001
    """A later family's GPU targets through the serving path (see the module docstring)."""
    from cosyserve.tools.bench import SYNTHETIC, full_size_yaml
    from cosyserve.tools.loadtest import run_concurrency_bench

    plans = ("cuda_eager", "jit_fp16") if DEVICE == "cuda" else ("eager",)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "m"
        t0 = time.perf_counter()
        config = Path(yaml) if yaml else full_size_yaml(family)
        make_model(config, model_dir, seed=0, speakers=SYNTHETIC[family].speakers or 1)
        res["family"], res["make_model_s"] = family, round(time.perf_counter() - t0, 1)
        for plan in plans:
            if left() < 120:
                res[plan] = f"skipped: only {left():.0f} s left"
                continue
            report = run_concurrency_bench(
                model_dir,
                concurrency=concurrency,
                tokens=TOKENS,
                plan=plan,
                device=DEVICE,
                max_seconds=max(60.0, left() - 60),
                baseline_requests=2,
            )
            stream, non_stream = report.get("stream", {}), report.get("non_stream", {})
            res[plan] = {
                "plan": report.get("plan"),
                "single_first_chunk_s": report.get("single_first_chunk_s"),
                "single_rtf_p50": non_stream.get("one_at_a_time", {}).get("rtf_p50"),
                "concurrent_throughput_ratio": report.get("throughput_ratio"),
                "concurrent_audio_s_per_wall_s": non_stream.get("batched", {}).get("audio_s_per_wall_s"),
                "concurrent_first_chunk_p50_s": stream.get("batched", {}).get("first_chunk_p50_s"),
                "failed": non_stream.get("batched", {}).get("failed"),
            }


def _report(res: dict, start: float, out: str | None) -> int:
    res["total_s"] = round(time.perf_counter() - start, 1)
    text = json.dumps(res, indent=1)
    print(text)
    if out:
        Path(out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
