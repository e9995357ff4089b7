"""Parity of the DiT estimator against upstream recordings: every `est_*` array of each parity set
(single calls on recorded inputs; stage outputs through forward hooks). Tolerances from the set's
README: DiT single call 1e-4."""

from __future__ import annotations

import copy

import pytest
import torch

from cosyserve.nn.dit import DiT, attention_masks
from tests.families.cosyvoice3.parity.test_flow import load_set_flow
from tests.helpers.parity import ParitySet, assert_close

pytestmark = [pytest.mark.parity, pytest.mark.timeout(300)]

ATOL_DIT = 1e-4
INPUTS = ("x", "mask", "mu", "t", "spks", "cond")


def dit_of(ps: ParitySet) -> DiT:
    return load_set_flow(ps).decoder.estimator


def inputs(ps: ParitySet, call: str) -> list[torch.Tensor]:
    return [ps.t(f"{call}_{name}") for name in INPUTS]


def test_stages_of_call0(parity_set: ParitySet) -> None:
    """time embedding, input embedding (with the causal conv position embedding), block 0, the
    final adaptive norm and the output, on the recorded inputs of the first Euler step."""
    ps = parity_set
    dit = dit_of(ps)
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        dit.transformer_blocks[0].register_forward_hook(lambda m, a, out: seen.__setitem__("block0", out)),
        dit.norm_out.register_forward_hook(lambda m, a, out: seen.__setitem__("norm_out", out)),
        dit.input_embed.register_forward_hook(lambda m, a, out: seen.__setitem__("input_embed", out)),
    ]
    args = inputs(ps, "est_call0")
    try:
        with torch.inference_mode():
            seen["time_embed"] = dit.time_embed(args[INPUTS.index("t")])
            out = dit(*args)
    finally:
        for h in hooks:
            h.remove()
    for stage in ("time_embed", "input_embed", "block0", "norm_out"):
        assert_close(ps, f"est_call0_{stage}", seen[stage], ps.t(f"est_call0_{stage}"), ATOL_DIT)
    assert_close(ps, "est_call0_out", out, ps.t("est_call0_out"), ATOL_DIT)


@pytest.mark.parametrize("streaming", [False, True], ids=["full", "stream"])
def test_padded_batch(parity_set: ParitySet, streaming: bool) -> None:
    """The standalone call with a right-padded row, with full and with chunk-masked attention."""
    ps = parity_set
    with torch.inference_mode():
        out = dit_of(ps)(*inputs(ps, "est_free"), streaming=streaming)
    key = "est_free_out_stream" if streaming else "est_free_out_full"
    assert_close(ps, key, out, ps.t(key), ATOL_DIT)


def test_streaming_chunks_do_not_see_the_future(parity_set: ParitySet) -> None:
    """With chunk masks, the first chunk's output ignores later frames (what makes a streaming
    chunk's frames final); with full attention it does not."""
    ps = parity_set
    chunk = ps.config.flow.dit.static_chunk_size
    args = inputs(ps, "est_free")
    if not 0 < chunk < int(args[1][0].sum()):
        pytest.skip("the standalone call's first row fits in one attention chunk")
    changed = [a.clone() for a in args]
    changed[0][..., chunk:] += 1.0  # x after the first chunk
    dit = dit_of(ps)
    with torch.inference_mode():
        stream, stream_changed = (dit(*a, streaming=True)[0, :, :chunk] for a in (args, changed))
        full, full_changed = (dit(*a, streaming=False)[0, :, :chunk] for a in (args, changed))
    torch.testing.assert_close(stream, stream_changed, rtol=0, atol=1e-6)
    assert (full - full_changed).abs().max() > 100 * ATOL_DIT


def test_right_padding_leaves_valid_frames_alone(parity_set: ParitySet) -> None:
    """A padded row equals the same row run alone on its valid frames: what lets the flow batch
    requests of different lengths."""
    ps = parity_set
    args = inputs(ps, "est_free")
    valid = int(args[1][1, 0].sum())
    if valid == args[1].shape[2]:
        pytest.skip("the standalone call has no padded row")
    dit = dit_of(ps)
    for streaming in (False, True):
        with torch.inference_mode():
            both = dit(*args, streaming=streaming)
            alone = dit(*(a[1:2, ..., :valid] if a.dim() == 3 else a[1:2] for a in args), streaming=streaming)
        torch.testing.assert_close(both[1:2, :, :valid], alone, rtol=0, atol=1e-5)


def test_attention_masks(parity_set: ParitySet) -> None:
    """Chunked visibility (a frame sees its own and all earlier chunks), key padding, and the
    upstream fallback for rows that would see nothing."""
    chunk = parity_set.config.flow.dit.static_chunk_size or 4
    frames = 2 * chunk + 3
    mask = torch.ones(2, 1, frames)
    mask[1, :, chunk + 1 :] = 0
    allowed, keep = attention_masks(mask, streaming=True, chunk_size=chunk)
    assert allowed is not None and keep is not None
    i, j = torch.meshgrid(torch.arange(frames), torch.arange(frames), indexing="ij")
    expect0 = j < (i // chunk + 1) * chunk
    assert torch.equal(allowed[0, 0], expect0)
    assert torch.equal(allowed[1, 0], expect0 & (j <= chunk))
    assert torch.equal(keep, mask[:, 0].bool())
    none, _ = attention_masks(torch.ones(1, 1, frames), streaming=False, chunk_size=chunk)
    assert none is None  # full attention over valid frames needs no mask
    empty, keep_empty = attention_masks(torch.zeros(1, 1, frames), streaming=False, chunk_size=chunk)
    assert empty is not None and bool(empty.all()) and bool(keep_empty.all())


class _Streaming(torch.nn.Module):
    """The DiT with chunk-masked attention, as its own graph (ONNX has no Python flags)."""

    def __init__(self, dit: DiT):
        super().__init__()
        self.dit = dit

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.dit(*args, streaming=True)


@pytest.mark.parametrize("streaming", [False, True], ids=["full", "stream"])
def test_onnx_export(parity_set: ParitySet, streaming: bool, tmp_path) -> None:
    """Exported at the first Euler step's length, run by ONNX Runtime on the padded standalone
    call: dynamic batch and time axes, masks built in the graph."""
    ort = pytest.importorskip("onnxruntime")
    ps = parity_set
    dit = dit_of(ps)
    module = _Streaming(dit) if streaming else dit
    dynamic = {name: {0: "batch", 2: "frames"} for name in ("x", "mask", "mu", "cond", "out")}
    dynamic.update(t={0: "batch"}, spks={0: "batch"})
    path = tmp_path / "dit.onnx"
    with torch.no_grad():
        torch.onnx.export(
            module,
            tuple(inputs(ps, "est_call0")),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=list(INPUTS),
            output_names=["out"],
            dynamic_axes=dynamic,
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {name: ps.arrays[f"est_free_{name}"] for name in INPUTS})[0]
    key = "est_free_out_stream" if streaming else "est_free_out_full"
    assert_close(ps, f"{key} (onnx)", torch.from_numpy(out), ps.t(key), ATOL_DIT)


def test_fused_qkv_is_bit_identical(parity_set: ParitySet) -> None:
    """One GEMM for q, k and v gives the same bits as three; the parameters become views of the
    fused weight (no extra memory, same state dict); moving the module falls back to three."""
    ps = parity_set
    dit = copy.deepcopy(dit_of(ps))
    args = inputs(ps, "est_call0")
    with torch.inference_mode():
        separate = dit(*args)
        assert dit.fuse_qkv()
        attn = dit.transformer_blocks[0].attn
        assert attn._fused() is not None
        assert attn.to_q.weight.untyped_storage().data_ptr() == attn.to_v.weight.untyped_storage().data_ptr()
        assert torch.equal(dit(*args), separate)
        assert set(dit.state_dict()) == set(dit_of(ps).state_dict())
        dit.double()
        assert attn._fused() is None
        torch.testing.assert_close(dit(*(a.double() for a in args)).float(), separate, rtol=0, atol=1e-5)
