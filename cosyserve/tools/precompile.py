"""`cosyserve precompile`: export the estimator ONNX (optionally the HiFT conv-stack ONNX) and
build TensorRT engines ahead of time, so a server start does not spend minutes on it.

Steps, with progress on stderr:

1. check the model directory and load the flow (and HiFT) weights only (not the 1.2 GB LLM);
2. ``flow.decoder.estimator.fp32.onnx``: use the directory's file when it matches the weights,
   else export it (checked against the eager estimator on odd lengths and a masked row);
3. with ``--vocoder``: ``hift.decoder.fp32.onnx`` (the CPU plan uses it when COSYSERVE_ORT_VOCODER=1);
4. with TensorRT and a CUDA GPU: build ``flow.decoder.estimator.{fp16|fp32}.{gpu}.plan`` with
   upstream's shape profile, load it with ``--trt_concurrent`` contexts and check it.

Exit codes: 0 when everything this machine can build was built (without TensorRT/CUDA the ONNX
files are the result, and the message says the engine needs TensorRT on a CUDA machine);
1 when a build that this machine should do failed (ONNX export, or the engine build where
TensorRT and CUDA are present), or the model directory is broken; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import sys
import time

from cosyserve.errors import AccelerationMismatchError, CosyserveError


def _say(message: str) -> None:
    print(f"[precompile] {message}", file=sys.stderr, flush=True)


def precompile(
    model_dir: str,
    *,
    fp16: bool = False,
    trt_concurrent: int = 1,
    max_batch: int = 2,
    vocoder: bool = False,
    force: bool = False,
) -> int:
    import torch

    from cosyserve.acceleration import onnx_export as ox
    from cosyserve.acceleration import trt
    from cosyserve.families.cosyvoice1.config import load_model_config
    from cosyserve.families.cosyvoice1.loader import find_model_files, load_network
    from cosyserve.hub import resolve_model_dir

    t_start = time.perf_counter()
    root = resolve_model_dir(model_dir)
    files = find_model_files(root)
    config = load_model_config(files.config)
    out_dir = ox.artifact_dir(files.root)
    _say(f"model {files.root}; artifacts go to {out_dir}")

    _say("loading the flow weights ...")
    flow = load_network("flow", files, config)
    estimator = flow.decoder.estimator
    threads = torch.get_num_threads()

    # -- 1. estimator ONNX
    onnx_path = None if force else ox.find_artifact(files.root, ox.ESTIMATOR_ONNX)
    if onnx_path is not None:
        try:
            runner = ox.OrtEstimator(onnx_path, threads)
            ox.check_estimator(runner, estimator, onnx_path.name)
            _say(f"estimator ONNX present and matching: {onnx_path}")
        except CosyserveError as exc:
            _say(f"{exc.message}")
            onnx_path = None
    if onnx_path is None:
        _say(f"exporting the flow estimator to ONNX (opset {ox.DEFAULT_OPSET}, dynamic batch and time) ...")
        try:
            target = out_dir / ox.ESTIMATOR_ONNX
            onnx_path = ox.export_estimator(estimator, target)
            ox.check_estimator(ox.OrtEstimator(onnx_path, threads), estimator, onnx_path.name)
        except Exception as exc:  # noqa: BLE001 - report any export failure as the result
            _say(f"FAILED: estimator ONNX export: {type(exc).__name__}: {exc}")
            return 1
        _say(f"wrote {onnx_path} ({onnx_path.stat().st_size / 1e6:.0f} MB), checked against eager")

    # -- 2. HiFT conv stack ONNX (CPU plan)
    if vocoder:
        hift_path = None if force else ox.find_artifact(files.root, ox.HIFT_ONNX)
        if hift_path is None:
            _say("exporting the HiFT conv stack to ONNX (CPU plan) ...")
            try:
                hift = load_network("hift", files, config)
                hift_path = ox.export_hift(hift, out_dir / ox.HIFT_ONNX)
                err = ox.compare_hift(ox.OrtHiFTDecoder(hift, hift_path, threads), hift)
                if err > 1e-3:
                    raise AccelerationMismatchError(f"relative error {err:.2e}")
            except Exception as exc:  # noqa: BLE001
                _say(f"FAILED: HiFT ONNX export: {type(exc).__name__}: {exc}")
                return 1
            _say(f"wrote {hift_path}")
        else:
            _say(f"HiFT ONNX present: {hift_path}")

    # -- 3. TensorRT engine
    try:
        trt.require_tensorrt()
    except CosyserveError as exc:
        _say(f"TensorRT engine not built: {exc.message}")
        _say(
            "the ONNX export is done; the engine build needs TensorRT on a CUDA machine "
            "(run `cosyserve precompile` there, or let the server build it on first start)"
        )
        _say(f"done in {time.perf_counter() - t_start:.0f} s")
        return 0
    if not torch.cuda.is_available():
        _say("TensorRT is installed but no CUDA GPU is visible: engine not built")
        return 0
    plan = out_dir / trt.engine_name(fp16)
    try:
        if plan.is_file() and force:
            plan.unlink()
        runner, desc = trt.load_or_build(
            onnx_path, out_dir, fp16=fp16, concurrent=trt_concurrent, max_batch=max_batch, progress=_say
        )
        ref = estimator.to("cuda").half() if fp16 else estimator.to("cuda")
        err = ox.check_estimator(runner, ref, plan.name, rtol=5e-2 if fp16 else 1e-3)
    except Exception as exc:  # noqa: BLE001
        _say(f"FAILED: TensorRT engine: {type(exc).__name__}: {exc}")
        return 1
    _say(f"{desc}; matches eager (relative error {err:.1e})")
    _say(f"done in {time.perf_counter() - t_start:.0f} s")
    return 0


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model_dir", "--model-dir", required=True, help="CosyVoice v1 model directory")
    parser.add_argument("--fp16", action="store_true", help="build the TensorRT engine in FP16")
    parser.add_argument(
        "--trt_concurrent",
        "--trt-concurrent",
        type=int,
        default=1,
        help="TensorRT execution contexts to create as a check (default 1)",
    )
    parser.add_argument(
        "--max_batch",
        "--max-batch",
        type=int,
        default=2,
        help="largest estimator batch in the engine profile (2 = one request, upstream's)",
    )
    parser.add_argument(
        "--vocoder",
        action="store_true",
        help="also export the HiFT conv-stack ONNX (used by the CPU plan when COSYSERVE_ORT_VOCODER=1)",
    )
    parser.add_argument("--force", action="store_true", help="re-export / rebuild even when files exist")


def main(args: argparse.Namespace) -> int:
    if args.trt_concurrent < 1 or args.max_batch < 2 or args.max_batch % 2:
        print(
            "cosyserve precompile: --trt_concurrent must be >= 1 and --max_batch an even number >= 2",
            file=sys.stderr,
        )
        return 2
    try:
        return precompile(
            args.model_dir,
            fp16=args.fp16,
            trt_concurrent=args.trt_concurrent,
            max_batch=args.max_batch,
            vocoder=args.vocoder,
            force=args.force,
        )
    except CosyserveError as exc:
        print(f"cosyserve precompile: {exc.message}", file=sys.stderr)
        return 1
