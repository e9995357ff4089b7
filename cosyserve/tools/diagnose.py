"""`cosyserve diagnose`: what this machine can run, what a model directory holds, and what to fix.

Checks Python, the torch build, CUDA (driver, GPU, memory), TensorRT, ONNX Runtime and its
providers, CPU features and threads, memory, optionally a model directory (files, config,
every checkpoint's keys and shapes against the architecture, speakers, ONNX files, acceleration
artifacts), and the configuration ``--auto`` would pick (the factory's plan chain, each plan
preflighted). Every problem comes with advice. Exit code 1 when something needed is broken (a
broken model directory, no plan that can run); missing optional accelerators are warnings.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

OK, INFO, WARN, ERROR = "ok", "info", "warn", "error"
_MARK = {OK: "ok  ", INFO: "info", WARN: "WARN", ERROR: "FAIL"}
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx_vnni")


@dataclass
class Check:
    area: str
    name: str
    status: str
    detail: str
    advice: str = ""


class Report:
    def __init__(self) -> None:
        self.checks: list[Check] = []
        self.plan: dict[str, Any] = {}

    def add(self, area: str, name: str, status: str, detail: str, advice: str = "") -> Check:
        check = Check(area, name, status, detail, advice)
        self.checks.append(check)
        return check

    @property
    def ok(self) -> bool:
        return not any(c.status == ERROR for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": [asdict(c) for c in self.checks], "plan": self.plan}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------ system


def check_python(report: Report) -> None:
    v = sys.version_info
    status = OK if v >= (3, 10) else ERROR
    report.add(
        "system",
        "python",
        status,
        f"{platform.python_version()} ({sys.executable})",
        "" if status == OK else "cosyserve needs Python 3.10 or newer",
    )


def check_torch(report: Report) -> Any:
    try:
        import torch
    except ImportError as exc:
        report.add("system", "torch", ERROR, f"not importable: {exc}", "pip install 'torch==2.13.*'")
        return None
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    engines = ",".join(e for e in torch.backends.quantized.supported_engines if e != "none") or "none"
    report.add(
        "system",
        "torch",
        OK,
        f"{torch.__version__} ({build}; oneDNN {torch.backends.mkldnn.is_available()}; "
        f"quantized engines {engines})",
    )
    return torch


def check_cuda(report: Report, torch: Any) -> None:
    if torch is None:
        return
    if not torch.version.cuda:
        report.add(
            "gpu",
            "cuda",
            INFO,
            "CPU-only torch build: GPU plans are skipped",
            "on a CUDA machine install a CUDA build of torch to use the GPU plans",
        )
        return
    if not torch.cuda.is_available():
        report.add(
            "gpu",
            "cuda",
            WARN,
            f"torch built for CUDA {torch.version.cuda} but no usable GPU/driver",
            "check `nvidia-smi`; the driver must support this CUDA version",
        )
        return
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        report.add(
            "gpu",
            f"cuda:{i}",
            OK,
            f"{props.name}, compute {props.major}.{props.minor}, {total / 1024**3:.1f} GiB "
            f"({free / 1024**3:.1f} GiB free)",
        )
    driver = _nvidia_driver()
    report.add(
        "gpu", "driver", OK if driver else INFO, driver or "nvidia-smi not found (driver version unknown)"
    )


def _nvidia_driver() -> str | None:
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (
        f"driver {out.stdout.strip().splitlines()[0]}" if out.returncode == 0 and out.stdout.strip() else None
    )


def check_tensorrt(report: Report, torch: Any) -> None:
    from cosyserve.acceleration.trt import INSTALL_ADVICE, require_tensorrt
    from cosyserve.errors import AcceleratorUnavailableError

    has_cuda = torch is not None and torch.cuda.is_available()
    try:
        trt = require_tensorrt()
    except AcceleratorUnavailableError as exc:
        status = WARN if has_cuda else INFO
        detail = "not installed" if "not installed" in exc.message else exc.message
        advice = INSTALL_ADVICE if has_cuda else "only needed on a CUDA machine (the TensorRT estimator plan)"
        report.add("accel", "tensorrt", status, detail, advice)
        return
    report.add(
        "accel",
        "tensorrt",
        OK if has_cuda else INFO,
        f"{trt.__version__}" + ("" if has_cuda else " (installed, but no CUDA GPU to run it)"),
    )


def check_onnxruntime(report: Report) -> None:
    try:
        import onnxruntime
    except ImportError:
        report.add(
            "accel",
            "onnxruntime",
            ERROR,
            "not installed",
            "pip install onnxruntime (zero-shot front-end models and the fast CPU estimator need it)",
        )
        return
    providers = onnxruntime.get_available_providers()
    report.add("accel", "onnxruntime", OK, f"{onnxruntime.__version__}; providers: {', '.join(providers)}")
    onnx_version = _version("onnx")
    report.add(
        "accel",
        "onnx",
        OK if onnx_version else WARN,
        onnx_version or "not installed",
        "" if onnx_version else "pip install onnx (needed to export the estimator ONNX)",
    )


def check_cpu(report: Report, torch: Any, cpuinfo: str = "/proc/cpuinfo") -> None:
    from cosyserve.runtime.threads import physical_cores

    model = "unknown"
    flags: set[str] = set()
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        model = platform.processor() or "unknown"
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    cores = physical_cores()
    report.add("cpu", "processor", OK, f"{model}; {usable} usable logical CPUs, {cores} physical cores")
    if flags:
        have = [f for f in CPU_FEATURES if f in flags]
        status = OK if "avx2" in flags else WARN
        report.add(
            "cpu",
            "features",
            status,
            ", ".join(have) or "no AVX2",
            "" if status == OK else "without AVX2 the CPU path is several times slower",
        )
        if {"avx512_bf16", "amx_bf16"} & flags:
            report.add(
                "cpu",
                "bfloat16",
                OK,
                "native: the opt-in plan `--force_config cpu_bf16` runs the LLM and flow estimator "
                "linear layers in bf16 (AMX where present)",
            )
    if torch is not None:
        threads = torch.get_num_threads()
        status = OK if threads <= usable else WARN
        report.add(
            "cpu",
            "threads",
            status,
            f"torch {threads} intra-op / {torch.get_num_interop_threads()} inter-op "
            f"(the CPU plans use {cores} intra-op, 1 inter-op)",
            "" if status == OK else "OMP_NUM_THREADS exceeds the usable CPUs: unset it",
        )
    mem = _meminfo()
    if mem:
        total, avail = mem
        status = OK if avail >= 3.0 else WARN
        report.add(
            "cpu",
            "memory",
            status,
            f"{total:.1f} GiB total, {avail:.1f} GiB available",
            "" if status == OK else "the full-size model needs about 2.5 GiB of free memory",
        )


def _meminfo() -> tuple[float, float] | None:
    try:
        info = {
            line.split(":")[0]: int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
        }
    except (OSError, ValueError, IndexError):
        return None
    return info.get("MemTotal", 0) / 1024**2, info.get("MemAvailable", 0) / 1024**2


# ------------------------------------------------------------------------------------ model directory


def check_model_dir(report: Report, model_dir: str) -> None:
    import torch

    from cosyserve.errors import CosyserveError
    from cosyserve.families.cosyvoice1.config import load_model_config
    from cosyserve.families.cosyvoice1.loader import (
        CONFIG_FILE,
        ZERO_SHOT_FILES,
        build_network,
        check_state_dict,
        find_model_files,
        read_checkpoint,
        read_speakers,
    )

    area = "model"
    try:
        from cosyserve.hub import resolve_model_dir

        root = resolve_model_dir(model_dir)
        files = find_model_files(root)
    except CosyserveError as exc:
        report.add(area, "files", ERROR, exc.message, "download the model again, or point --model_dir at it")
        return
    report.add(
        area, "files", OK, f"{files.root}: cosyvoice.yaml, llm.pt, flow.pt, hift.pt, spk2info.pt present"
    )
    try:
        config = load_model_config(files.config)
    except CosyserveError as exc:
        report.add(area, "config", ERROR, exc.message, "cosyvoice.yaml must be a CosyVoice v1 config")
        return
    report.add(area, "config", OK, f"{config.family}, {config.sample_rate} Hz")
    for name, path in (("llm", files.llm), ("flow", files.flow), ("hift", files.hift)):
        try:
            state = read_checkpoint(path)
            if name == "hift":
                from cosyserve.nn.hift import convert_hift_state_dict

                state = convert_hift_state_dict(state)
            with torch.device("meta"):  # shapes only: nothing is allocated or initialised
                module = build_network(name, config)
            check_state_dict(module, state, path, config_name=CONFIG_FILE)
            count = sum(v.numel() for v in state.values())
            report.add(
                area, path.name, OK, f"{len(state)} tensors, {count:,} values, shapes match the config"
            )
        except (CosyserveError, KeyError, RuntimeError) as exc:
            message = getattr(exc, "message", str(exc))
            report.add(
                area,
                path.name,
                ERROR,
                message,
                f"{path.name} is damaged or from another model: download it again",
            )
    try:
        speakers = read_speakers(files.spk2info, config.llm.spk_embed_dim)
        report.add(
            area,
            "spk2info.pt",
            OK if speakers else WARN,
            f"{len(speakers)} speakers: {', '.join(speakers)}",
            "" if speakers else "no built-in voices: only zero-shot / saved voices will work",
        )
    except CosyserveError as exc:
        report.add(area, "spk2info.pt", ERROR, exc.message, "download spk2info.pt again")
    for name in ZERO_SHOT_FILES:
        path = files.root / name
        if not path.is_file():
            report.add(
                area,
                name,
                WARN,
                "absent: zero-shot / cross-lingual cloning unavailable",
                f"add {name} from the official model to enable voice cloning",
            )
            continue
        problem = _onnx_problem(path)
        report.add(
            area,
            name,
            ERROR if problem else OK,
            problem or f"{path.stat().st_size:,} bytes, loadable",
            f"{name} is damaged: download it again" if problem else "",
        )
    check_artifacts(report, files.root)


def _onnx_problem(path: Path) -> str | None:
    try:
        import onnx

        onnx.load(str(path), load_external_data=False)
    except ImportError:
        return None
    except Exception as exc:  # noqa: BLE001 - protobuf decode errors and friends
        return f"not a readable ONNX model ({type(exc).__name__}: {str(exc)[:120]})"
    return None


def check_artifacts(report: Report, root: Path) -> None:
    """Acceleration files in (or for) the model directory: estimator ONNX, TensorRT plans, TorchScript."""
    from cosyserve.acceleration.onnx_export import ESTIMATOR_ONNX, artifact_dir

    found = []
    folders = {root, artifact_dir(root)}
    for folder in folders:
        for path in [
            *folder.glob("flow.decoder.estimator.*"),
            *folder.glob("hift.decoder.*"),
            *folder.glob("*.zip"),
        ]:
            found.append(path.name)
    if any(name == ESTIMATOR_ONNX for name in found):
        detail = ", ".join(sorted(set(found)))
        report.add("model", "accel files", OK, detail)
    else:
        report.add(
            "model",
            "accel files",
            INFO,
            ", ".join(sorted(set(found))) or "none yet",
            "`cosyserve precompile --model_dir DIR` exports the estimator ONNX (and TensorRT engines on a GPU) "
            "ahead of time; otherwise the first start does it",
        )


# ------------------------------------------------------------------------------------ plan


def check_plan(report: Report) -> None:
    from cosyserve.acceleration.apply import preflight
    from cosyserve.acceleration.launcher import detect_hardware, plan_chain

    hw = detect_hardware()
    chain, why = plan_chain(hw, SimpleNamespace(auto=True, force_config=None))
    steps = []
    chosen = None
    for plan in chain:
        try:
            preflight(plan)
            steps.append({"plan": plan.name, "ok": True})
            chosen = chosen or plan.name
        except Exception as exc:  # noqa: BLE001 - any reason is reported
            steps.append({"plan": plan.name, "ok": False, "reason": str(exc)})
    report.plan = {"chain": steps, "reason": why, "picks": chosen}
    if chosen is None:
        report.add(
            "plan",
            "--auto",
            ERROR,
            f"no configuration passes its checks ({why})",
            "see the reasons above; the eager CPU plan needs only torch",
        )
        return
    skipped = [s for s in steps if not s["ok"] and steps.index(s) < [x["plan"] for x in steps].index(chosen)]
    detail = f"{chosen} ({why})"
    if skipped:
        detail += "; skipped: " + "; ".join(f"{s['plan']}: {s['reason']}" for s in skipped)
    report.add("plan", "--auto", OK, detail)


# ------------------------------------------------------------------------------------ CLI


def diagnose(model_dir: str | None = None) -> Report:
    report = Report()
    check_python(report)
    torch = check_torch(report)
    check_cuda(report, torch)
    check_tensorrt(report, torch)
    check_onnxruntime(report)
    check_cpu(report, torch)
    if model_dir:
        check_model_dir(report, model_dir)
    if torch is not None:
        check_plan(report)
    return report


def format_report(report: Report) -> str:
    lines = []
    area = None
    for c in report.checks:
        if c.area != area:
            area = c.area
            lines.append(f"[{area}]")
        lines.append(f"  {_MARK[c.status]}  {c.name}: {c.detail}")
        if c.advice and c.status in (WARN, ERROR, INFO):
            lines.append(f"        -> {c.advice}")
    lines.append("")
    lines.append("everything needed works" if report.ok else "PROBLEMS FOUND: see FAIL lines above")
    return "\n".join(lines)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model_dir", "--model-dir", default=None, help="also check this model directory")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def main(args: argparse.Namespace) -> int:
    report = diagnose(args.model_dir)
    if args.json:
        print(json.dumps(report.as_dict(), ensure_ascii=False, indent=2))
    else:
        print(format_report(report))
    return 0 if report.ok else 1
