"""Acceleration backends, each compared with the eager path on the tiny model.

CPU: ONNX export + ONNX Runtime (estimator, HiFT conv stack), int8 LLM, the static-shape decode
step behind the CUDA graphs, official TorchScript files, the FP16 guard, TensorRT's "not
installed" path. CUDA (skipped without a GPU): the captured decode step, FP16 flow, torch.compile.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cosyserve.acceleration import apply as accel
from cosyserve.acceleration import fp16, jit, quant
from cosyserve.acceleration import onnx_export as ox
from cosyserve.errors import AccelerationMismatchError, AcceleratorUnavailableError
from cosyserve.families.cosyvoice1.loader import load_model_directory
from cosyserve.nn.config import EstimatorConfig
from cosyserve.nn.unet import ConditionalDecoder
from cosyserve.runtime import memory, threads

logger = logging.getLogger(__name__)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TINY_ESTIMATOR = EstimatorConfig(
    channels=(32, 32), attention_head_dim=16, n_blocks=1, num_mid_blocks=2, num_heads=2
)


def _estimator(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ConditionalDecoder(TINY_ESTIMATOR).eval()


# ------------------------------------------------------------------------------------ ONNX


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    est = _estimator()
    path = ox.export_estimator(est, tmp_path_factory.mktemp("onnx") / ox.ESTIMATOR_ONNX)
    return est, path


@pytest.mark.parametrize("batch,frames", [(2, 4), (2, 5), (2, 37), (2, 101), (4, 37)])
def test_onnx_estimator_matches_eager(exported: tuple[nn.Module, Path], batch: int, frames: int) -> None:
    est, path = exported
    runner = ox.OrtEstimator(path, threads=1)
    assert runner.static_batch is None  # dynamic batch: 2 = one CFG pair, 2B = B requests
    args = ox.estimator_example(batch, frames, seed=frames)
    with torch.inference_mode():
        ref = est(*args)
    got = runner(*args)
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=1e-4), float((got - ref).abs().max())
    # Masked frames come out exactly zero, as in eager.
    masked = args[1][1, 0] == 0
    assert torch.count_nonzero(got[1][:, masked]) == 0


def test_static_batch_onnx_runs_cfg_pairs(tmp_path: Path) -> None:
    """Upstream's file has a static batch of 2: a batch of 2B runs as B pairs (rows i, B + i)."""
    est = _estimator()
    path = ox.export_estimator(est, tmp_path / "static.onnx", dynamic_batch=False)
    runner = ox.OrtEstimator(path, threads=1)
    assert runner.static_batch == 2
    args = ox.estimator_example(6, 19)
    with torch.inference_mode():
        ref = est(*args)
    assert torch.allclose(runner(*args), ref, atol=1e-4)


def test_streamed_weights_export_is_the_same_network(
    exported: tuple[nn.Module, Path], tmp_path: Path
) -> None:
    """`stream_weights` (the graph exported alone, the weights appended one tensor at a time, the
    linear layers' weight transposes folded): one valid file with the official inputs and every
    weight as an initializer, computing what the default export computes."""
    import onnx

    est, default_path = exported
    path = ox.export_estimator(est, tmp_path / "streamed.onnx", stream_weights=True)
    assert not (tmp_path / "streamed.onnx.partial").exists()
    onnx.checker.check_model(str(path))
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == list(ox.ESTIMATOR_INPUTS)
    initializers = {t.name for t in model.graph.initializer}
    assert not any(n.op_type == "Transpose" and n.input[0] in initializers for n in model.graph.node)

    def stored(m: onnx.ModelProto) -> int:
        return sum(int(np.prod(t.dims)) for t in m.graph.initializer)

    # The same weights (the default export also folds a few small constants).
    assert abs(stored(model) - stored(onnx.load(str(default_path)))) < 0.01 * stored(model)
    args = ox.estimator_example(4, 37, seed=5)
    with torch.inference_mode():
        ref = est(*args)
    streamed = ox.OrtEstimator(path, threads=1)(*args)
    assert torch.allclose(streamed, ref, atol=1e-4)
    assert torch.allclose(streamed, ox.OrtEstimator(default_path, threads=1)(*args), atol=1e-5)


def test_existing_onnx_is_checked_and_refused_when_stale(tmp_path: Path) -> None:
    est = _estimator(0)
    runner, desc = ox.load_or_export_estimator(tmp_path, est, threads=1)
    assert "exported" in desc and (tmp_path / ox.ESTIMATOR_ONNX).is_file()
    runner, desc = ox.load_or_export_estimator(tmp_path, est, threads=1)
    assert "found" in desc
    # Other weights: the found file no longer matches, so it is not used; a fresh export is.
    other = _estimator(1)
    runner, desc = ox.load_or_export_estimator(tmp_path, other, threads=1)
    assert "exported" in desc
    assert ox.compare_estimators(runner, other) < 1e-5
    with pytest.raises(AccelerationMismatchError, match="does not match"):
        ox.check_estimator(ox.OrtEstimator(tmp_path / ox.ESTIMATOR_ONNX, 1), other, "stale file")


def test_ort_hift_matches_eager(tiny_model_copy: Path) -> None:
    model = load_model_directory(tiny_model_copy)
    hift = model.hift
    mel = torch.randn(1, 80, 41, generator=torch.Generator().manual_seed(3))
    ref, _ = hift.inference(mel, generator=torch.Generator().manual_seed(0))
    patch, desc = ox.install_ort_hift(tiny_model_copy, hift, threads=1)
    assert "exported" in desc
    got, _ = hift.inference(mel, generator=torch.Generator().manual_seed(0))
    patch.remove()
    assert torch.allclose(got, ref, atol=1e-4), float((got - ref).abs().max())


# ------------------------------------------------------------------------------------ plans


def _build(model_dir: Path, plan_name: str):
    from cosyserve.acceleration.launcher import PLANS, build_backend, open_family

    return build_backend(
        open_family(model_dir),
        str(model_dir),
        PLANS[plan_name],
        SimpleNamespace(voices_dir=None, stream_first_hop=None),
    )


def test_cpu_onnx_plan_matches_eager(tiny_model_copy: Path) -> None:
    eager = _build(tiny_model_copy, "eager")
    fast = _build(tiny_model_copy, "cpu_onnx")
    with torch.inference_mode():
        _compare_flow_and_vocoder(eager, fast)
    if memory._libc is not None:  # glibc: the position projections' weights are paged out between steps
        cold = {id(t) for t in memory._cold_weights}
        positions = [m.linear_pos.weight for m in fast.model.llm.modules() if hasattr(m, "linear_pos")]
        assert positions and all(id(w) in cold for w in positions)


def test_cpu_int8_plan_serves_close_to_eager(tiny_model_copy: Path) -> None:
    from cosyserve.acceleration.launcher import warm_up

    eager = _build(tiny_model_copy, "eager")
    int8 = _build(tiny_model_copy, "cpu_int8")
    applied = int8.options.extra["accelerations"]
    assert any(a.startswith("int8 flow estimator") for a in applied), applied
    assert any(a.startswith("int8 llm") for a in applied), applied
    assert int8.model.flow.decoder.estimator_runner is None  # torch int8, no ONNX Runtime session
    assert warm_up(int8) > 0  # real audio through the whole int8 pipeline (the guard checks it)
    tokens = torch.randint(0, 4096, (1, 57), generator=torch.Generator().manual_seed(0))
    emb = eager.speakers["英文女"]
    mels = [
        b.model.flow.inference(tokens, embedding=emb, generator=torch.Generator().manual_seed(1))[0]
        for b in (eager, int8)
    ]
    rel = float((mels[1] - mels[0]).norm() / mels[0].norm())
    assert 0 < rel < 0.05, rel


def _compare_flow_and_vocoder(eager, fast) -> None:  # noqa: ANN001
    applied = fast.options.extra["accelerations"]
    assert any(a.startswith("cpu threads") for a in applied)
    assert any("onnxruntime estimator" in a for a in applied)
    assert fast.model.flow.decoder.estimator_runner is not None
    tokens = torch.randint(0, 4096, (1, 57), generator=torch.Generator().manual_seed(0))
    emb = eager.speakers["英文女"]
    mel_e, _ = eager.model.flow.inference(tokens, embedding=emb, generator=torch.Generator().manual_seed(1))
    mel_f, _ = fast.model.flow.inference(tokens, embedding=emb, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(mel_f, mel_e, atol=1e-4), float((mel_f - mel_e).abs().max())
    wav_e, _ = eager.model.hift.inference(mel_e, generator=torch.Generator().manual_seed(2))
    wav_f, _ = fast.model.hift.inference(mel_e, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(wav_f, wav_e, atol=1e-4)


def test_int8_llm_deviation_is_small(tiny_loaded_model) -> None:
    llm = tiny_loaded_model.llm
    q = quant.quantized_copy(llm)
    assert type(q.llm.encoders[0].self_attn.linear_pos) is nn.Linear  # position projection stays float
    attn = q.llm.encoders[0].self_attn
    assert isinstance(attn.linear_qkv, quant.Int8Linear) and not hasattr(attn, "linear_q")  # fused
    assert isinstance(q.llm_decoder, quant.Int8Linear)
    assert isinstance(q.text_encoder.encoders[0].feed_forward.w_1, quant.Int8Linear)
    text = torch.randint(0, 5000, (1, 9), generator=torch.Generator().manual_seed(0))
    emb = tiny_loaded_model.speakers["英文女"]
    dev = quant.llm_deviation(llm, q, text, emb, steps=40)
    logger.info("int8 deviation on the tiny model: %s", dev.as_dict())
    assert dev.steps == 40
    assert dev.kl_mean < 1e-2
    assert dev.logp_mean_abs < 0.05
    assert dev.top1_agreement >= 0.9


def test_fused_qkv_projection_matches_the_separate_ones(tiny_loaded_model) -> None:
    import copy

    llm = tiny_loaded_model.llm
    fused = copy.deepcopy(llm)
    for layer in fused.llm.encoders:
        layer.self_attn.fuse_qkv()
    text = torch.randint(0, 5000, (1, 9), generator=torch.Generator().manual_seed(0))
    prefix = llm.build_prefix(text, embedding=tiny_loaded_model.speakers["英文女"])
    with torch.inference_mode():
        ref, cache_ref = llm.prefill(prefix)
        got, cache_got = fused.prefill(prefix)
        assert torch.allclose(got, ref, atol=1e-5)
        for token in (3, 77, 5):
            ref = llm.decode_step(torch.tensor([token]), cache_ref)
            got = fused.decode_step(torch.tensor([token]), cache_got)
            assert torch.allclose(got, ref, atol=1e-5), float((got - ref).abs().max())


def test_packed_linear_equals_f_linear_and_copies() -> None:
    import copy

    from cosyserve.acceleration.packed import PackedLinear, packing_available

    if not packing_available():
        pytest.skip("this torch build has no oneDNN")
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(48, 80)
    packed = PackedLinear.from_linear(linear)
    for shape in ((1, 48), (3, 1, 48), (2, 7, 48), (0, 48)):
        x = torch.randn(*shape, generator=gen)
        with torch.inference_mode():
            got, ref = packed(x), linear(x)
        assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-5), shape
    clone = copy.deepcopy(packed)
    x = torch.randn(2, 48, generator=gen)
    with torch.inference_mode():
        assert torch.equal(clone(x), packed(x))


def _same_decoding(ref_llm, got_llm, prefix: torch.Tensor, tokens=(3, 77, 5)) -> None:  # noqa: ANN001
    with torch.inference_mode():
        ref, cache_ref = ref_llm.prefill(prefix) if hasattr(ref_llm, "prefill") else (None, None)
        if ref is None:  # CosyVoice2/3: the batch runner's protocol
            cache_ref, cache_got = ref_llm.new_cache(1, 64), got_llm.new_cache(1, 64)
            ref, got = ref_llm.prefill_logp(prefix, cache_ref), got_llm.prefill_logp(prefix, cache_got)
        else:
            got, cache_got = got_llm.prefill(prefix)
        assert torch.allclose(got, ref, atol=1e-5), float((got - ref).abs().max())
        for token in tokens:
            ref = ref_llm.decode_step(torch.tensor([token]), cache_ref)
            got = got_llm.decode_step(torch.tensor([token]), cache_got)
            assert torch.allclose(got, ref, atol=1e-5), float((got - ref).abs().max())


def test_packed_llm_decodes_like_eager(tiny_loaded_model, tiny_v2_backend) -> None:  # noqa: ANN001
    import copy

    from cosyserve.acceleration.packed import PackedLinear, pack_llm, packing_available

    if not packing_available():
        pytest.skip("this torch build has no oneDNN")
    # CosyVoice v1: the conformer LLM (q/k/v fused; the position projection stays nn.Linear)
    llm = tiny_loaded_model.llm
    packed = copy.deepcopy(llm)
    assert pack_llm(packed) > 0
    attn = packed.llm.encoders[0].self_attn
    assert isinstance(attn.linear_qkv, PackedLinear) and not hasattr(attn, "linear_q")
    assert type(attn.linear_pos) is nn.Linear
    assert isinstance(packed.llm_decoder, PackedLinear)
    text = torch.randint(0, 5000, (1, 9), generator=torch.Generator().manual_seed(0))
    _same_decoding(llm, packed, llm.build_prefix(text, embedding=tiny_loaded_model.speakers["英文女"]))
    # CosyVoice2: the Qwen2 backbone (q/k/v and gate/up fused) and the speech head
    llm2 = tiny_v2_backend.model.llm
    packed2 = copy.deepcopy(llm2)
    assert pack_llm(packed2) > 0
    layer = packed2.backbone.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, PackedLinear) and isinstance(
        layer.mlp.gate_up_proj, PackedLinear
    )
    assert isinstance(packed2.llm_decoder, PackedLinear)
    _same_decoding(llm2, packed2, llm2.build_prefix([5, 17, 99, 3]))


def test_cpu_fast_plan_packs_the_llm(tiny_model_copy: Path) -> None:
    from cosyserve.acceleration.packed import PackedLinear, packing_available

    if not packing_available():
        pytest.skip("this torch build has no oneDNN")
    fast = _build(tiny_model_copy, "cpu_fast")
    applied = fast.options.extra["accelerations"]
    assert any(a.startswith("packed fp32 llm") for a in applied), applied
    assert isinstance(fast.model.llm.llm_decoder, PackedLinear)
    eager = _build(tiny_model_copy, "eager")
    assert type(eager.model.llm.llm_decoder) is nn.Linear  # the baseline stays plain torch


def test_fused_projections_keep_the_estimators_outputs() -> None:
    from cosyserve.nn.dit import DiT, DiTConfig

    torch.manual_seed(0)
    dit = DiT(DiTConfig(dim=64, depth=2, heads=4, dim_head=16, static_chunk_size=8)).eval()
    dit.fuse_qkv()  # as loaded: q/k/v views of one tensor, then one module
    for estimator in (_estimator(), dit):
        fused = copy.deepcopy(estimator)
        for module in fused.modules():
            if hasattr(module, "fuse_projections"):
                module.fuse_projections()
                module.fuse_projections()  # once: a second call changes nothing
                assert isinstance(module.to_qkv, nn.Linear) and not hasattr(module, "to_q")
        args = ox.estimator_example(2, 21, seed=3)
        with torch.inference_mode():
            ref, got = estimator(*args), fused(*args)
        assert torch.allclose(got, ref, rtol=0, atol=1e-5), float((got - ref).abs().max())


def _require_bf16() -> None:
    from cosyserve.acceleration.packed import bf16_native

    if not bf16_native():
        pytest.skip("this CPU has no native bfloat16 (AVX512-BF16/AMX)")


def test_bf16_packed_linear_matches_a_bf16_product() -> None:
    from cosyserve.acceleration.packed import PackedLinear

    _require_bf16()
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    x = torch.randn(7, 96)
    got = PackedLinear.from_linear(linear, torch.bfloat16, rows_hint=None)(x)
    assert got.dtype == torch.float32 and got.shape == (7, 40)
    ref = F.linear(x.bfloat16().float(), linear.weight.bfloat16().float(), linear.bias.bfloat16().float())
    assert torch.allclose(got, ref, rtol=1e-2, atol=1e-2), float((got - ref).abs().max())
    assert not torch.allclose(got, linear(x), rtol=0, atol=1e-7)  # really in bf16


def test_cpu_bf16_plan_packs_llm_and_estimator(tiny_model_copy: Path) -> None:
    from cosyserve.acceleration.packed import PackedLinear

    _require_bf16()
    backend = _build(tiny_model_copy, "cpu_bf16")
    applied = backend.options.extra["accelerations"]
    assert any(a.startswith("bf16 flow estimator") for a in applied), applied
    assert any(a.startswith("bf16 llm") for a in applied), applied
    llm = backend.model.llm
    assert isinstance(llm.llm_decoder, PackedLinear) and llm.llm_decoder.dtype == torch.float32  # head
    packed = [m for m in llm.modules() if isinstance(m, PackedLinear) and m is not llm.llm_decoder]
    assert packed and all(m.dtype == torch.bfloat16 for m in packed)
    estimator = backend.model.flow.decoder.estimator
    assert not [m for m in estimator.modules() if type(m) is nn.Linear]
    eager = _build(tiny_model_copy, "eager")
    args = ox.estimator_example(2, 37)
    with torch.inference_mode():
        ref, got = eager.model.flow.decoder.estimator(*args), estimator(*args)
    err = float((got - ref).abs().max()) / float(ref.abs().max())
    assert 0 < err < 5e-2, err


def test_cpu_bf16_plan_refused_without_native_bf16(monkeypatch) -> None:  # noqa: ANN001
    from cosyserve.acceleration.launcher import PLANS

    monkeypatch.setattr(accel, "bf16_native", lambda: False)
    with pytest.raises(AcceleratorUnavailableError, match="no native bfloat16"):
        accel.preflight(PLANS["cpu_bf16"])


def test_bf16_native_reads_the_cpu_flags(tmp_path: Path) -> None:
    from cosyserve.acceleration.packed import bf16_native

    plain = tmp_path / "plain"
    plain.write_text("flags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert not bf16_native(str(plain))
    assert not bf16_native(str(tmp_path / "missing"))


def test_int8_layers_run_the_torch_ao_kernel_unchanged() -> None:
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32))
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = "x86" if "x86" in torch.backends.quantized.supported_engines else before
    try:
        reference = quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
    finally:
        torch.backends.quantized.engine = before
    lean = copy.deepcopy(model)
    quant._quantize_linears(lean, ["0", "2"], engine="x86")
    assert isinstance(lean[0], quant.Int8Linear) and isinstance(lean[2], quant.Int8Linear)
    x = torch.randn(3, 5, 64)
    assert torch.equal(lean(x), reference(x))


def test_int8_estimator_deviation_is_bounded(tiny_loaded_model) -> None:
    est = copy.deepcopy(tiny_loaded_model.flow.decoder.estimator)
    linears = sum(type(m) is nn.Linear for m in est.modules())
    convs = sum(isinstance(m, nn.Conv1d) for m in est.modules())
    args = ox.estimator_example(2, 23, seed=5)
    with torch.inference_mode():
        ref = est(*args)
    count, err = quant.quantize_estimator_int8(est)
    assert count == linears and not any(type(m) is nn.Linear for m in est.modules())
    assert sum(isinstance(m, nn.Conv1d) for m in est.modules()) == convs  # convolutions stay float
    layers = [m for m in est.modules() if isinstance(m, quant.Int8Linear)]
    assert len(layers) == linears
    if "onednn" in torch.backends.quantized.supported_engines:  # 8-bit activations only with VNNI/AMX
        assert all(m.reduce_range is not quant.int8_dot_product() for m in layers)
    with torch.inference_mode():
        got = est(*args)
    rel = float((got - ref).abs().max()) / max(1.0, float(ref.abs().max()))
    logger.info("int8 estimator relative error on the tiny model: load check %.2e, here %.2e", err, rel)
    assert 0 < err < quant.ESTIMATOR_INT8_RTOL and 0 < rel < quant.ESTIMATOR_INT8_RTOL


def test_int8_estimator_check_refuses_a_broken_quantisation(tiny_loaded_model, monkeypatch) -> None:
    def broken(root: nn.Module, names: list[str], engine: str) -> None:
        modules = dict(root.named_modules())
        for name in names:
            modules[name].weight.data.mul_(3.0)  # stands for a kernel or packing bug

    monkeypatch.setattr(quant, "_quantize_linears", broken)
    est = copy.deepcopy(tiny_loaded_model.flow.decoder.estimator)
    with pytest.raises(AccelerationMismatchError, match="deviates from FP32"):
        quant.quantize_estimator_int8(est)


def test_int8_layers_keep_their_kernel_whatever_the_global_engine() -> None:
    engines = torch.backends.quantized.supported_engines
    if not {"onednn", "fbgemm"} <= set(engines):
        pytest.skip("needs both oneDNN and fbgemm")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32))
    x = torch.randn(7, 64)
    onednn = copy.deepcopy(model)
    quant._quantize_linears(onednn, ["0", "2"], engine="onednn")
    before = torch.backends.quantized.engine
    expected = onednn(x)
    assert torch.backends.quantized.engine == before  # the global engine is restored
    torch.backends.quantized.engine = "fbgemm"
    try:
        assert torch.equal(onednn(x), expected)
    finally:
        torch.backends.quantized.engine = before
    assert float((expected - model(x)).abs().max()) < 0.05 * float(model(x).abs().max())


@pytest.mark.parametrize("vnni", [False, True])
def test_int8_activation_range_follows_the_cpu(vnni: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """8-bit activations only for oneDNN on VNNI/AMX; 7 bits, which any x86 CPU computes without
    overflow, are accurate whatever the CPU."""
    monkeypatch.setattr(quant, "int8_dot_product", lambda: vnni)
    assert quant.reduce_range_for("fbgemm") and quant.reduce_range_for("x86")
    assert quant.reduce_range_for("onednn") is not vnni
    if "onednn" not in torch.backends.quantized.supported_engines:
        return
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32))
    int8 = copy.deepcopy(model)
    quant._quantize_linears(int8, ["0", "2"], engine="onednn")
    assert [int8[0].reduce_range, int8[2].reduce_range] == [not vnni] * 2
    if not vnni:  # the fallback must be right on any CPU (8 bits can only be checked on VNNI)
        x = torch.randn(7, 64)
        with torch.no_grad():
            assert float((int8(x) - model(x)).abs().max()) < 0.05 * float(model(x).abs().max())


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("fpu avx avx2 fma f16c", False),
        ("avx2 avx512f avx512_vnni", True),
        ("avx2 avx_vnni", True),
        (None, False),
    ],
)
def test_int8_dot_product_reads_the_cpu_flags(flags: str | None, expected: bool, tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"  # None: no such file (not Linux)
    if flags is not None:
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert quant.int8_dot_product(str(cpuinfo)) is expected


def test_int8_refuses_cuda_llm() -> None:
    class Fake(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1, device="meta"))

    with pytest.raises(AcceleratorUnavailableError, match="CPU only"):
        quant.quantize_llm_int8(Fake())


# ------------------------------------------------------------------------------------ decode step


def test_static_decode_step_matches_eager(tiny_model_dir: Path) -> None:
    """The CUDA-graph decode step (run uncaptured here) = the eager step: batch 1 with cache
    growth, and a ragged left-padded batch."""
    model = load_model_directory(tiny_model_dir)
    with torch.inference_mode():
        _compare_decode(model)


def test_static_decode_step_runs_fused_qkv_projections(tiny_model_dir: Path) -> None:
    model = load_model_directory(tiny_model_dir)
    for layer in model.llm.llm.encoders:
        layer.self_attn.fuse_qkv()  # as the int8 plan does
    with torch.inference_mode():
        _compare_decode(model)


def _compare_decode(model) -> None:  # noqa: ANN001
    llm = model.llm
    text = torch.randint(0, 5000, (1, 7), generator=torch.Generator().manual_seed(0))
    emb = model.speakers["英文女"]
    ref = list(llm.generate(text, embedding=emb, generator=3, num_tokens=300))
    decoder = jit.install_graphed_decoder(llm, use_graphs=False)
    assert list(llm.generate(text, embedding=emb, generator=3, num_tokens=300)) == ref

    p1 = llm.build_prefix(text, embedding=emb)
    p2 = llm.build_prefix(text[:, :3], embedding=emb)
    pad = [0, p1.shape[1] - p2.shape[1]]
    x = torch.cat([p1, torch.cat([torch.zeros(1, pad[1], p1.shape[2]), p2], dim=1)])
    outs = []
    for step in (decoder.eager_decode_step, llm.decode_step):
        cache = llm.new_cache(2, p1.shape[1] + 4, pad=pad)
        llm.prefill_hidden(x, cache)
        outs.append(torch.stack([step(torch.tensor([t, t + 7]), cache) for t in range(40)]))
    assert torch.allclose(outs[0], outs[1], atol=1e-4)


# ------------------------------------------------------------------------------------ TorchScript


class _UpstreamStyleEncoder(nn.Module):
    """A scripted module with upstream's encoder signature (tracing our encoder inside)."""

    def __init__(self, traced: torch.jit.ScriptModule):
        super().__init__()
        self.enc = traced

    def forward(
        self, xs: Tensor, xs_lens: Tensor, decoding_chunk_size: int = 0, num_decoding_left_chunks: int = -1
    ) -> tuple[Tensor, Tensor]:
        return self.enc(xs, xs_lens)


class _Positional(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, xs: Tensor, xs_lens: Tensor) -> tuple[Tensor, Tensor]:
        return self.encoder(xs, xs_lens)


def _write_flow_encoder_zip(encoder: nn.Module, path: Path) -> None:
    """A stand-in for an official file: traced at the check length (enough for these tests)."""
    xs = torch.randn(1, jit.VERIFY_FRAMES, encoder.cfg.input_size)
    lens = torch.tensor([jit.VERIFY_FRAMES], dtype=torch.int32)
    with torch.no_grad(), pytest.warns(Warning):
        traced = torch.jit.trace(_Positional(encoder), (xs, lens), check_trace=False)
    torch.jit.script(_UpstreamStyleEncoder(traced)).save(str(path))


def test_official_torchscript_file_used_when_it_matches(tiny_model_copy: Path) -> None:
    model = load_model_directory(tiny_model_copy)
    _write_flow_encoder_zip(model.flow.encoder, tiny_model_copy / "flow.encoder.fp32.zip")
    fresh = load_model_directory(tiny_model_copy)
    notes = jit.load_torchscript_parts(tiny_model_copy, fresh.llm, fresh.flow, fp16=False)
    assert notes == ["torchscript flow.encoder.fp32.zip"]
    assert isinstance(fresh.flow.encoder, jit.ScriptedEncoder)
    xs = torch.randn(1, jit.VERIFY_FRAMES, fresh.flow.cfg.input_size)
    with torch.inference_mode():
        assert torch.allclose(fresh.flow.encoder(xs)[0], model.flow.encoder(xs)[0], atol=1e-5)


def test_official_torchscript_file_refused_when_it_differs(tiny_model_copy: Path) -> None:
    model = load_model_directory(tiny_model_copy)
    with torch.no_grad():
        for p in model.flow.encoder.parameters():
            p.add_(0.5)  # "other weights"
    _write_flow_encoder_zip(model.flow.encoder, tiny_model_copy / "flow.encoder.fp32.zip")
    fresh = load_model_directory(tiny_model_copy)
    notes = jit.load_torchscript_parts(tiny_model_copy, fresh.llm, fresh.flow, fp16=False)
    assert len(notes) == 1 and notes[0].startswith("refused flow.encoder.fp32.zip")
    assert not isinstance(fresh.flow.encoder, jit.ScriptedEncoder)


class _UpstreamStyleLLM(nn.Module):
    """Upstream's llm.llm.forward_chunk contract (att_cache [layers, heads, T, 2 d_k]) on our Encoder."""

    def __init__(self, enc: nn.Module):
        super().__init__()
        self.enc = enc

    def forward_chunk(self, xs, offset, required_cache_size, att_cache, cnn_cache, att_mask):  # noqa: ANN001
        n = xs.shape[1]
        cache = self.enc.new_cache(1, offset + n)
        if att_cache.numel():
            for layer in range(len(cache.k)):
                k, v = att_cache[layer].chunk(2, dim=-1)
                cache.k[layer][0, :, :offset] = k
                cache.v[layer][0, :, :offset] = v
        cache.length = offset
        out = self.enc.forward_chunk(xs, cache)
        new = torch.stack(
            [torch.cat([k[0, :, : offset + n], v[0, :, : offset + n]], -1) for k, v in zip(cache.k, cache.v)]
        )
        return out, new, cnn_cache


@torch.inference_mode()
def test_scripted_llm_adapter_decodes_like_eager(tiny_loaded_model) -> None:
    llm = tiny_loaded_model.llm
    adapter = jit.ScriptedLLM(_UpstreamStyleLLM(llm.llm), llm.llm)
    assert jit._check_llm(adapter, llm.llm, 1e-3) < 1e-5


# ------------------------------------------------------------------------------------ FP16 guard


def _nan_runner(x: Tensor, mask: Tensor, mu: Tensor, t: Tensor, spks: Tensor, cond: Tensor) -> Tensor:
    return torch.full_like(x, float("nan"))  # what an overflowing FP16 estimator gives


def _flat_runner(x: Tensor, mask: Tensor, mu: Tensor, t: Tensor, spks: Tensor, cond: Tensor) -> Tensor:
    # Euler then lands exactly on 0 at t = 1: a flat (silent) mel.
    return -x / (1 - t).view(-1, 1, 1)


@pytest.mark.parametrize("runner,reason", [(_nan_runner, "NaN"), (_flat_runner, "flat")])
def test_fp16_guard_recomputes_in_fp32(tiny_model_copy: Path, runner, reason: str) -> None:
    from cosyserve.acceleration.launcher import warm_up

    backend = _build(tiny_model_copy, "eager")
    flow = backend.model.flow
    tokens = torch.randint(0, 4096, (1, 50), generator=torch.Generator().manual_seed(0))
    emb = backend.speakers["英文女"]
    ref, _ = flow.inference(tokens, embedding=emb, generator=torch.Generator().manual_seed(1))
    guard = fp16.install_fp16_guard(backend, backend.accel_targets(), probe=False)
    flow.decoder.estimator_runner = runner  # the "FP16" estimator misbehaves
    got, _ = flow.inference(tokens, embedding=emb, generator=torch.Generator().manual_seed(1))
    assert guard.tripped and reason in guard.reason
    assert flow.decoder.estimator_runner is None  # the flow alone went back to (eager) FP32
    assert torch.allclose(got, ref, atol=1e-5)  # the bad chunk was recomputed, not lost
    assert "fp16_guard" in backend.options.extra
    assert warm_up(backend) > 0


def test_fp16_guard_probe_trips_at_warm_up(tiny_model_copy: Path) -> None:
    backend = _build(tiny_model_copy, "eager")
    backend.model.flow.decoder.estimator_runner = _nan_runner
    guard = fp16.install_fp16_guard(backend, backend.accel_targets(), probe=True)
    assert guard.tripped and "NaN" in guard.reason


def test_fp16_guard_checks_every_chunk(tiny_model_copy: Path) -> None:
    backend = _build(tiny_model_copy, "eager")
    assert backend.audio_guard is None  # FP32 plans: no per-chunk check
    guard = fp16.install_fp16_guard(backend, backend.accel_targets(), probe=False)
    assert backend.audio_guard == guard.check_chunk
    short_pause = np.zeros(1000, np.float32)  # a short silent chunk is legitimate
    assert guard.check_chunk(short_pause) is short_pause and not guard.tripped
    audio = np.array([0.1, float("nan"), 0.2], np.float32)
    out = guard.check_chunk(audio)
    assert np.all(np.isfinite(out)) and out[1] == 0
    assert guard.tripped and "NaN/inf audio" in guard.reason
    assert backend.model.flow.decoder.estimator_runner is None


# ------------------------------------------------------------------------------------ TensorRT


def test_tensorrt_missing_is_reported_with_advice(monkeypatch: pytest.MonkeyPatch) -> None:
    from cosyserve.acceleration import trt
    from cosyserve.acceleration.launcher import PLANS

    if trt.tensorrt_version() is not None:
        pytest.skip("TensorRT is installed here")
    with pytest.raises(AcceleratorUnavailableError, match=r"TensorRT is not installed.*cosyserve\[gpu\]"):
        trt.require_tensorrt()
    monkeypatch.setattr(accel, "_cuda_available", lambda: True)
    with pytest.raises(AcceleratorUnavailableError, match="TensorRT is not installed"):
        accel.preflight(PLANS["trt_jit_fp16"])
    accel.preflight(PLANS["jit_fp16"])  # the next plan in the chain passes its preflight


def test_tensorrt_names_and_profile() -> None:
    from cosyserve.acceleration import trt

    assert (
        trt.engine_name(True, "NVIDIA H100 80GB HBM3")
        == "flow.decoder.estimator.fp16.nvidia-h100-80gb-hbm3.plan"
    )
    assert trt.engine_name(False, "Tesla T4") == "flow.decoder.estimator.fp32.tesla-t4.plan"
    assert trt.profile_shapes("x", (-1, 80, -1)) == ((2, 80, 4), (2, 80, 500), (2, 80, 3000))
    assert trt.profile_shapes("mask", (2, 1, -1)) == ((2, 1, 4), (2, 1, 500), (2, 1, 3000))
    assert trt.profile_shapes("t", (-1,), max_batch=8) == ((2,), (2,), (8,))
    assert trt.profile_shapes("spks", (2, 80)) == ((2, 80), (2, 80), (2, 80))


def test_preflight_is_cheap_and_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    from cosyserve.acceleration.launcher import PLANS, AccelPlan

    monkeypatch.setattr(accel, "_cuda_available", lambda: False)
    with pytest.raises(AcceleratorUnavailableError, match="CUDA is not available"):
        accel.preflight(PLANS["jit"])
    with pytest.raises(AcceleratorUnavailableError, match="fp16 needs a CUDA device"):
        accel.preflight(AccelPlan("x", "cpu", fp16=True))
    with pytest.raises(AcceleratorUnavailableError, match="CPU only"):
        monkeypatch.setattr(accel, "_cuda_available", lambda: True)
        accel.preflight(AccelPlan("x", "cuda", int8=True))
    accel.preflight(PLANS["cpu_fast"])
    accel.preflight(PLANS["cpu_int8"])


def test_cpu_threads() -> None:
    assert threads.physical_cores() >= 1
    text = threads.configure_cpu_threads()
    assert "intra-op" in text and torch.get_num_threads() == threads.physical_cores()


# ------------------------------------------------------------------------------------ CUDA


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_graph_decode_matches_eager(tiny_model_dir: Path, dtype: torch.dtype) -> None:
    model = load_model_directory(tiny_model_dir, device="cuda")
    llm = model.llm.to(dtype)
    with torch.inference_mode():
        _compare_cuda_decode(model, llm, dtype)


def _compare_cuda_decode(model, llm, dtype) -> None:  # noqa: ANN001
    text = torch.randint(0, 5000, (1, 7), generator=torch.Generator().manual_seed(0)).cuda()
    emb = model.speakers["英文女"].cuda()
    prefix = llm.build_prefix(text, embedding=emb)
    decoder = jit.install_graphed_decoder(llm)
    tokens = torch.randint(0, 4096, (200,), generator=torch.Generator().manual_seed(1)).tolist()
    rows = []
    for step in (decoder.eager_decode_step, llm.decode_step):
        _, cache = llm.prefill(prefix, capacity=prefix.shape[1] + 64)  # grows twice on the way
        rows.append(torch.stack([step(torch.tensor([t], device="cuda"), cache).float() for t in tokens]))
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    assert torch.allclose(rows[0], rows[1], atol=tol), float((rows[0] - rows[1]).abs().max())
    assert 1 <= decoder.captures <= 3  # one capture per cache identity, not per step


@needs_cuda
def test_cuda_fp16_flow_with_guard(tiny_model_copy: Path) -> None:
    from cosyserve.acceleration.launcher import AccelPlan

    backend = _build(tiny_model_copy, "eager")  # CPU backend object, moved to CUDA FP16 below
    backend.model.flow.to("cuda").half()
    guard = fp16.install_fp16_guard(backend, backend.accel_targets(), probe=True)
    logger.info("fp16 guard on CUDA: tripped=%s %s", guard.tripped, guard.reason)
    tokens = torch.randint(0, 4096, (1, 50), generator=torch.Generator().manual_seed(0)).cuda()
    emb = backend.speakers["英文女"].cuda()
    with torch.inference_mode():
        mel, _ = backend.model.flow.inference(tokens, embedding=emb, generator=torch.Generator(device="cuda"))
    assert fp16.mel_problem(mel) is None
    assert AccelPlan("x", "cuda", fp16=True).fp16


@needs_cuda
def test_cuda_compiled_estimator_matches_eager(tiny_loaded_model) -> None:
    import copy

    flow = copy.deepcopy(tiny_loaded_model.flow).cuda()
    est = flow.decoder.estimator
    jit.compile_estimator(flow.decoder)
    with torch.inference_mode():
        _compare_compiled(flow, est)


def _compare_compiled(flow, est) -> None:  # noqa: ANN001
    for frames in (37, 53):
        args = tuple(a.cuda() for a in ox.estimator_example(2, frames))
        ref = est(*args)
        got = flow.decoder.estimator_runner(*args)
        assert torch.allclose(got, ref, atol=1e-3), float((got - ref).abs().max())
