"""The operator's tools on the tiny generated model: diagnose, precompile, bench."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cosyserve.cli import main as cli
from cosyserve.tools import bench, diagnose


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli(["--log-level", "WARNING", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _trt_installed() -> bool:
    from cosyserve.acceleration.trt import tensorrt_version

    return tensorrt_version() is not None


# ------------------------------------------------------------------------------------ diagnose


def test_diagnose_healthy_model(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "diagnose", "--json", "--model_dir", str(tiny_model_dir))
    report = json.loads(out)
    assert code == 0 and report["ok"] is True
    names = {c["name"]: c for c in report["checks"]}
    for name in (
        "python",
        "torch",
        "onnxruntime",
        "processor",
        "llm.pt",
        "flow.pt",
        "hift.pt",
        "spk2info.pt",
    ):
        assert name in names, name
    assert names["flow.pt"]["status"] == "ok" and "shapes match" in names["flow.pt"]["detail"]
    assert report["plan"]["picks"] in ("cpu_fast", "trt_jit_fp16", "jit_fp16", "jit", "cuda_eager")


def test_diagnose_reports_missing_tensorrt(capsys: pytest.CaptureFixture[str]) -> None:
    if _trt_installed():
        pytest.skip("TensorRT is installed here")
    code, out, _ = _run(capsys, "diagnose", "--json")
    trt = next(c for c in json.loads(out)["checks"] if c["name"] == "tensorrt")
    assert trt["status"] in ("info", "warn") and trt["detail"] == "not installed"
    assert trt["advice"]  # says what to do (or that only a CUDA machine needs it)
    assert code == 0  # TensorRT is optional: its absence is not "broken"


def test_diagnose_missing_file(tiny_model_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tiny_model_copy / "hift.pt").unlink()
    code, out, _ = _run(capsys, "diagnose", "--model_dir", str(tiny_model_copy))
    assert code == 1
    assert "FAIL" in out and "missing hift.pt" in out and "->" in out  # the problem and advice
    assert "PROBLEMS FOUND" in out


def test_diagnose_truncated_checkpoint(tiny_model_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tiny_model_copy / "flow.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    code, out, _ = _run(capsys, "diagnose", "--json", "--model_dir", str(tiny_model_copy))
    report = json.loads(out)
    assert code == 1 and report["ok"] is False
    flow = next(c for c in report["checks"] if c["name"] == "flow.pt")
    assert flow["status"] == "error" and "truncated or corrupt" in flow["detail"]
    assert "download it again" in flow["advice"]
    llm = next(c for c in report["checks"] if c["name"] == "llm.pt")
    assert llm["status"] == "ok"  # the other files are still checked


def test_diagnose_wrong_shapes(tiny_model_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    state = torch.load(tiny_model_copy / "llm.pt", weights_only=True)
    state["llm_decoder.weight"] = torch.zeros(3, 3)
    torch.save(state, tiny_model_copy / "llm.pt")
    code, out, _ = _run(capsys, "diagnose", "--json", "--model_dir", str(tiny_model_copy))
    llm = next(c for c in json.loads(out)["checks"] if c["name"] == "llm.pt")
    assert code == 1 and "llm_decoder.weight" in llm["detail"] and "wrong shape" in llm["detail"]


def test_diagnose_format_has_advice() -> None:
    report = diagnose.Report()
    report.add("x", "thing", diagnose.ERROR, "broken", "fix it like so")
    text = diagnose.format_report(report)
    assert "FAIL  thing: broken" in text and "-> fix it like so" in text and not report.ok


def test_diagnose_names_the_bf16_plan_where_the_cpu_has_bf16(tmp_path: Path) -> None:
    rows = {}
    for name, flags in (("amx", "fpu avx2 fma avx512f avx512_bf16 amx_bf16"), ("avx2", "fpu avx2 fma")):
        cpuinfo = tmp_path / name
        cpuinfo.write_text(f"model name\t: Test CPU\nflags\t\t: {flags}\n")
        report = diagnose.Report()
        diagnose.check_cpu(report, None, str(cpuinfo))
        rows[name] = {check.name: check.detail for check in report.checks}
    assert "cpu_bf16" in rows["amx"]["bfloat16"] and "amx_bf16" in rows["amx"]["features"]
    assert "bfloat16" not in rows["avx2"]


# ------------------------------------------------------------------------------------ precompile


def test_precompile_exports_onnx_and_explains_tensorrt(
    tiny_model_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if _trt_installed():
        pytest.skip("TensorRT is installed here")
    code, _, err = _run(
        capsys,
        "precompile",
        "--model_dir",
        str(tiny_model_copy),
        "--fp16",
        "--trt_concurrent",
        "2",
        "--vocoder",
    )
    assert code == 0, err
    assert (tiny_model_copy / "flow.decoder.estimator.fp32.onnx").is_file()
    assert (tiny_model_copy / "hift.decoder.fp32.onnx").is_file()
    assert "exporting the flow estimator" in err
    assert "needs TensorRT on a CUDA machine" in err
    # A second run reuses the checked file.
    code, _, err = _run(capsys, "precompile", "--model_dir", str(tiny_model_copy))
    assert code == 0 and "present and matching" in err


def test_precompile_broken_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "precompile", "--model_dir", str(tmp_path / "nothing"))
    assert code == 1 and "not found" in err


# ------------------------------------------------------------------------------------ bench


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc only")
def test_bench_worker_peak_rss_is_its_own_not_the_parents() -> None:
    """A worker forked by a parent that had just used a lot of memory (the bench's parent writes the
    synthetic model) reports its own peak (ru_maxrss would carry the parent's across exec)."""
    import numpy as np

    ballast = np.ones(1 << 28, dtype=np.float32)  # 1 GiB touched in this (parent) process
    probe = "from cosyserve.tools.bench import _peak_rss_mb; print(_peak_rss_mb())"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert float(ballast[-1]) == 1.0
    assert float(out.stdout) < 700, out.stdout  # MiB: the child's own few hundred, not 1 GiB+


def test_bench_in_process_json(tiny_model_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(
        capsys,
        "bench",
        "--model_dir",
        str(tiny_model_copy),
        "--config",
        "cpu_onnx",
        "--tokens",
        "45",
        "--runs",
        "1",
        "--warmup_s",
        "0",
        "--stream",
        "--stream_first_hop",
        "25",
        "--json",
        "--in_process",
    )
    assert code == 0, err
    results = json.loads(out)
    assert [r["config"] for r in results] == ["eager", "cpu_onnx"]
    for r in results:
        for key in (
            "config",
            "audio_s",
            "llm_tokens_per_s",
            "flow_s",
            "vocoder_s",
            "rtf",
            "first_chunk_s",
            "peak_rss_mb",
        ):
            assert r[key] is not None, (r["config"], key)
        assert r["tokens"] == 45
        assert (
            r["flow_s"] > 0
            and r["vocoder_s"] > 0
            and r["rtf_band"] in ("very fast", "fast", "acceptable", "slow")
        )
    assert set(results[1]["vs_eager"]) >= {"rtf", "flow_s", "vocoder_s", "llm_tokens_per_s"}
    assert any("onnxruntime" in a for a in results[1]["accelerations"])


def test_bench_subprocess_table(tiny_model_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(
        capsys,
        "bench",
        "--model_dir",
        str(tiny_model_copy),
        "--config",
        "eager",
        "--tokens",
        "30",
        "--runs",
        "1",
        "--warmup_s",
        "0",
    )
    assert code == 0, err
    assert "LLM tok/s" in out and "eager" in out and "peak RSS MB" in out


@pytest.mark.parametrize("family", ["cosyvoice2", "cosyvoice3"])
def test_bench_later_families(
    family: str, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    """CosyVoice2 (a built-in speaker) and CosyVoice3 (none: the warm-up's prompt recording) through
    the int8 plan; the default token count is 5 s of audio at their 25 Hz token rate."""
    fixture = {"cosyvoice2": "tiny_v2_model_dir", "cosyvoice3": "tiny_v3_model_dir"}[family]
    model_dir = request.getfixturevalue(fixture)
    args = ["bench", "--model_dir", str(model_dir), "--config", "cpu_int8", "--runs", "1"]
    code, out, err = _run(capsys, *args, "--warmup_s", "0", "--json", "--in_process")
    assert code == 0, err
    results = json.loads(out)
    assert [r["config"] for r in results] == ["eager", "cpu_int8"]
    for r in results:
        assert r["tokens"] == 125 and r["audio_s"] == pytest.approx(5.0, abs=0.05), r
        assert r["flow_s"] > 0 and r["vocoder_s"] > 0 and r["first_chunk_s"] > 0, r
    assert any("int8 llm" in a for a in results[1]["accelerations"])


def test_bench_synthetic_defaults_to_cosyvoice1(
    tiny_model_copy: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--synthetic` alone is the CosyVoice-300M-SFT architecture; `--family` picks another (the
    full-size directory is stood in for by the tiny one here)."""
    asked: list[str] = []

    def fake_synthetic_model_dir(cache: Path | None = None, family: str = "?") -> Path:
        asked.append(family)
        return tiny_model_copy

    monkeypatch.setattr(bench, "synthetic_model_dir", fake_synthetic_model_dir)
    args = ["--config", "eager", "--runs", "1", "--warmup_s", "0", "--no-stream", "--in_process"]
    for family in ([], ["--family", "cosyvoice2"]):
        code, _, err = _run(capsys, "bench", "--synthetic", *family, "--tokens", "20", *args)
        assert code == 0, err
    assert asked == ["cosyvoice1", "cosyvoice2"]


def test_bench_needs_a_model(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "bench")
    assert code == 2 and "--synthetic" in err
    code, _, err = _run(capsys, "bench", "--model_dir", ".", "--config", "nope")
    assert code in (1, 2)
    code, _, err = _run(capsys, "bench", "--model_dir", ".", "--family", "cosyvoice2")
    assert code == 2 and "--family picks the --synthetic model" in err


def test_bench_helpers() -> None:
    assert [bench.rtf_band(x) for x in (0.1, 0.5, 0.9, 3.0, None)] == [
        "very fast",
        "fast",
        "acceptable",
        "slow",
        "-",
    ]
    results = [
        {
            "config": "eager",
            "rtf": 4.0,
            "flow_s": 8.0,
            "vocoder_s": 2.0,
            "llm_tokens_per_s": 20.0,
            "first_chunk_s": 10.0,
            "peak_rss_mb": 2000.0,
            "audio_s": 5.0,
            "rtf_band": "slow",
        },
        {
            "config": "cpu_fast",
            "rtf": 2.0,
            "flow_s": 4.0,
            "vocoder_s": 1.0,
            "llm_tokens_per_s": 30.0,
            "first_chunk_s": 2.5,
            "peak_rss_mb": 1600.0,
            "audio_s": 5.0,
            "rtf_band": "slow",
        },
        {"config": "cpu_int8", "error": "worker exited 1: boom"},
    ]
    bench.add_ratios(results)
    assert results[1]["vs_eager"] == {
        "llm_tokens_per_s": 1.5,
        "flow_s": 2.0,
        "vocoder_s": 2.0,
        "rtf": 2.0,
        "first_chunk_s": 4.0,
        "peak_rss_mb": 1.25,
    }
    table = bench.format_table(results)
    assert "2.00 (2.00x)" in table and "error: worker exited 1" in table


def test_full_size_yaml_ships_with_the_package() -> None:
    from cosyserve.families.cosyvoice1.config import load_model_config

    config = load_model_config(bench.full_size_yaml())
    assert config.llm.llm.num_blocks == 14 and config.flow.estimator.num_mid_blocks == 12


@pytest.mark.parametrize("family", ["cosyvoice2", "cosyvoice3"])
def test_full_size_yaml_of_later_families(family: str) -> None:
    """CosyVoice2/3's full-size configs ship with the package, the backbone's config.json beside
    them, and describe the architectures of ../shared/models (the checkpoints' parameter counts)."""
    from cosyserve.nn.qwen2 import load_qwen2_config

    path = bench.full_size_yaml(family)
    assert path.is_file() and path.name == f"{family}.yaml"
    backbone = load_qwen2_config(path.parent / "CosyVoice-BlankEN")
    assert (backbone.hidden_size, backbone.num_hidden_layers, backbone.intermediate_size) == (896, 24, 4864)


def _gpu_check_dry_run(tmp_path: Path, *args: str) -> dict:
    """Run scripts/gpu_check.py on the CPU with `args`; returns its JSON report."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, str(root / "scripts" / "gpu_check.py"), "--device", "cpu", *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text())


def test_gpu_check_script_dry_run_on_cpu(tmp_path: Path) -> None:
    """The prepared GPU measurement runs end to end (CPU dry run, tiny model), so it has not
    rotted when a GPU is finally lent."""
    tiny = Path(__file__).resolve().parents[1] / "tests" / "families" / "cosyvoice1" / "tiny.yaml"
    res = _gpu_check_dry_run(tmp_path, "--yaml", str(tiny), "--tokens", "60")
    assert res["device"] == "cpu"
    for key in ("llm_fp32_b1_tok_s", "llm_fp32_b16_tok_s", "flow_fp32_s", "hift_fp32_s", "flow16_speedup"):
        assert res[key] > 0, (key, res)


def test_gpu_check_family_dry_run_on_cpu(tmp_path: Path) -> None:
    """--family measures a later family through the serving path (CPU dry run, tiny CosyVoice2):
    one request's first chunk and RTF, and concurrent requests against one at a time."""
    tiny = Path(__file__).resolve().parents[1] / "tests" / "families" / "cosyvoice2" / "tiny.yaml"
    args = ("--family", "cosyvoice2", "--yaml", str(tiny), "--tokens", "12", "--concurrency", "2")
    res = _gpu_check_dry_run(tmp_path, *args)
    assert res["family"] == "cosyvoice2"
    eager = res["eager"]
    assert eager["plan"] == "eager" and eager["failed"] == []
    for key in ("single_first_chunk_s", "single_rtf_p50", "concurrent_throughput_ratio"):
        assert eager[key] > 0, (key, res)
