"""Parity of the CosyVoice2 flow (tokens -> mel) against upstream recordings: every `flow_*` and
`est_*` array of each parity set, stage by stage. Tolerances from the set's README (v1's)."""

from __future__ import annotations

import re

import pytest
import torch

from cosyserve.errors import InvalidRequestError
from cosyserve.families.cosyvoice2.flow import CausalMaskedDiffWithXvec
from cosyserve.nn.cfm import FIXED_NOISE_FRAMES, fixed_flow_noise
from tests.helpers.parity import ParitySet, assert_close

pytestmark = [pytest.mark.parity, pytest.mark.timeout(300)]

ATOL_FEATURE = 1e-5  # encoder stages, mu, spks
ATOL_ESTIMATOR = 1e-4
ATOL_MEL = 2e-4
# The fixtures come from one CPU; another one's float32 kernels (AVX-512 vs AVX2) sum in another
# order, and the embedding's LayerNorm spreads that over its whole row: errors scale with the
# stage's magnitude (an Intel AVX-512 host: 6.1e-5 on values up to 98, i.e. 6e-7 of the scale).
SCALE_TOL = 2e-6  # ~16 float32 epsilons: the embedding and the lookahead convolutions after it


def assert_feature(ps: ParitySet, stage: str, actual: torch.Tensor) -> None:
    """An encoder / mu / spks stage within ATOL_FEATURE, or within a few float32 ulps of the
    stage's largest value where that is more."""
    expected = ps.t(stage)
    assert_close(ps, stage, actual, expected, max(ATOL_FEATURE, SCALE_TOL * float(expected.abs().max())))


# The recorded flow calls: (prompt?, streaming, finalize), as the set's README describes them.
CASES = {"ns": (False, False, True), "zs": (True, False, True), "chunk": (False, True, False)}

_FLOWS: dict[str, CausalMaskedDiffWithXvec] = {}


def load_flow(ps: ParitySet) -> CausalMaskedDiffWithXvec:
    """The set's flow with its (float16-stored) `flow.pt` loaded strictly, built once per set."""
    if ps.name not in _FLOWS:
        flow = CausalMaskedDiffWithXvec(ps.config.flow)
        flow.load_state_dict(torch.load(ps.path / "flow.pt", weights_only=True), strict=True)
        _FLOWS[ps.name] = flow.eval()
    return _FLOWS[ps.name]


def case_inputs(ps: ParitySet, case: str) -> dict:
    if f"flow_{case}_tokens" not in ps.arrays:
        pytest.skip(f"set has no flow_{case}_* arrays")
    prompt, streaming, finalize = CASES[case]
    kwargs = {"streaming": streaming, "finalize": finalize}
    if prompt:
        kwargs.update(
            prompt_tokens=ps.t(f"flow_{case}_prompt_tokens"),
            prompt_feat=ps.t(f"flow_{case}_prompt_feat"),
            embedding=ps.t(f"flow_{case}_embedding"),
        )
    else:
        kwargs.update(prompt_tokens=None, prompt_feat=None, embedding=ps.t("spk_embedding"))
    return kwargs


def test_fixed_noise_buffer(parity_set: ParitySet) -> None:
    """The fixed noise equals upstream's buffer, and drawing it leaves the global RNG alone."""
    head = parity_set.t("flow_rand_noise_head")
    state = torch.random.get_rng_state()
    fresh = fixed_flow_noise.__wrapped__()  # a new draw, not the cached one
    assert torch.equal(torch.random.get_rng_state(), state)
    assert fresh.shape == (1, 80, FIXED_NOISE_FRAMES)
    assert torch.equal(fresh[:, :, : head.shape[-1]], head)
    assert torch.equal(fixed_flow_noise(), fresh)
    noise = load_flow(parity_set).decoder.fixed_noise(head.shape[-1])
    assert torch.equal(noise, head)


def test_flow_call_longer_than_the_noise_is_refused(parity_set: ParitySet) -> None:
    with pytest.raises(InvalidRequestError, match="too long"):
        load_flow(parity_set).decoder.fixed_noise(FIXED_NOISE_FRAMES + 1)


def test_encoder_stages(parity_set: ParitySet) -> None:
    """Non-stream call: embed, pre-lookahead (zero context), token blocks, full encoder, mu."""
    ps = parity_set
    flow = load_flow(ps)
    tokens = ps.t("flow_ns_tokens")
    with torch.inference_mode():
        x = flow.input_embedding(tokens)
        embedded = flow.encoder.embed(x)
        lookahead = flow.encoder.pre_lookahead_layer(embedded)
        blocks = flow.encoder.token_blocks(x)
        raw = flow.encode(tokens)
        spks = flow.speaker_projection(ps.t("spk_embedding"))
    assert_feature(ps, "flow_ns_spks", spks)
    assert_feature(ps, "flow_ns_embed_out", embedded)
    assert_feature(ps, "flow_ns_lookahead_out", lookahead)
    assert_feature(ps, "flow_ns_blocks_out", blocks)
    assert_feature(ps, "flow_ns_encoder_raw", raw)


def test_chunk_lookahead_with_context(parity_set: ParitySet) -> None:
    """A non-final call: the last lookahead tokens are context of the pre-lookahead layer only."""
    ps = parity_set
    flow = load_flow(ps)
    tokens = ps.t("flow_chunk_tokens")
    n_context = ps.arrays["flow_chunk_context_embed"].shape[1]
    assert n_context == flow.pre_lookahead_len
    with torch.inference_mode():
        x = flow.input_embedding(tokens)
        embedded = flow.encoder.embed(x[:, :-n_context])
        context = flow.encoder.embed(x[:, -n_context:])
        lookahead = flow.encoder.pre_lookahead_layer(embedded, context)
    assert_feature(ps, "flow_chunk_embed_out", embedded)
    assert_feature(ps, "flow_chunk_context_embed", context)
    assert_feature(ps, "flow_chunk_lookahead_out", lookahead)


def estimator_inputs(ps: ParitySet, prefix: str) -> list[torch.Tensor]:
    return [ps.t(prefix + name) for name in ("x", "mask", "mu", "t", "spks", "cond")]


@pytest.mark.parametrize(
    ("call", "out", "streaming"),
    [("est_call0", "out", False), ("est_free", "out_full", False), ("est_free", "out_stream", True)],
)
def test_estimator(parity_set: ParitySet, call: str, out: str, streaming: bool) -> None:
    """Full attention vs the block-causal chunk mask, with a padded row (est_free)."""
    flow = load_flow(parity_set)
    inputs = estimator_inputs(parity_set, call + "_")
    with torch.inference_mode():
        result = flow.decoder.estimator(*inputs, streaming=streaming)
    assert_close(parity_set, f"{call}_{out}", result, parity_set.t(f"{call}_{out}"), ATOL_ESTIMATOR)
    # Padded frames must be exactly zero, not merely small.
    mask = inputs[1].expand_as(result)
    assert torch.all(result[mask == 0] == 0)


def test_chunk_mask_changes_the_estimator(parity_set: ParitySet) -> None:
    """The recorded streaming and full outputs differ, and each is only reproduced by its mode."""
    ps = parity_set
    flow = load_flow(ps)
    inputs = estimator_inputs(ps, "est_free_")
    frames = inputs[0].shape[-1]
    if frames <= flow.decoder.estimator.static_chunk_size:
        pytest.skip("est_free is not longer than one attention chunk")
    with torch.inference_mode():
        full = flow.decoder.estimator(*inputs)
    assert (full - ps.t("est_free_out_stream")).abs().max() > 100 * ATOL_ESTIMATOR


def recorded_steps(ps: ParitySet, n_steps: int) -> list[int]:
    """The Euler steps `flow_ns_est_dphi` holds, from the manifest's description of it."""
    desc = ps.manifest.get("arrays", {}).get("flow_ns_est_dphi", {}).get("desc", "")
    m = re.search(r"steps ([0-9][0-9, ]*)", desc)
    if m:
        return [int(s) for s in m.group(1).replace(",", " ").split()]
    if ps.arrays["flow_ns_est_dphi"].shape[0] == n_steps:
        return list(range(n_steps))
    pytest.skip("the manifest does not say which Euler steps flow_ns_est_dphi holds")
    return []


def test_euler_loop(parity_set: ParitySet) -> None:
    """The CFM alone from the recorded mu: per-step t (bit-exact), estimator outputs, final mel."""
    ps = parity_set
    cfm = load_flow(ps).decoder
    n_steps = ps.arrays["flow_ns_est_t"].shape[0]
    steps: list[tuple[torch.Tensor, torch.Tensor]] = []

    def recorder(*args: torch.Tensor) -> torch.Tensor:
        out = cfm.estimator(*args)
        steps.append((args[3].clone(), out.clone()))
        return out

    cfm.estimator_runner = recorder
    try:
        mel = cfm.solve_euler(
            ps.t("flow_ns_noise"),
            ps.t("flow_ns_mu"),
            ps.t("flow_ns_mask"),
            ps.t("flow_ns_spks"),
            ps.t("flow_ns_cond"),
            n_timesteps=n_steps,
        )
    finally:
        cfm.estimator_runner = None
    assert len(steps) == n_steps
    assert_close(ps, "flow_ns_est_t", torch.stack([s[0] for s in steps]), ps.t("flow_ns_est_t"), 0.0)
    picked = torch.stack([steps[i][1] for i in recorded_steps(ps, n_steps)])
    assert_close(ps, "flow_ns_est_dphi", picked, ps.t("flow_ns_est_dphi"), ATOL_ESTIMATOR)
    assert_close(ps, "flow_ns_mel (from mu)", mel, ps.t("flow_ns_mel"), ATOL_MEL)


@pytest.mark.parametrize("case", list(CASES))
def test_flow_inference(parity_set: ParitySet, case: str) -> None:
    """Tokens (+ prompt) -> mu, cond, noise and mel through prepare/decode."""
    ps = parity_set
    flow = load_flow(ps)
    kwargs = case_inputs(ps, case)
    tokens = ps.t(f"flow_{case}_tokens")
    item = flow.prepare(
        tokens,
        kwargs["prompt_tokens"],
        kwargs["prompt_feat"],
        kwargs["embedding"],
        kwargs["streaming"],
        kwargs["finalize"],
    )
    n_prompt = 0 if kwargs["prompt_tokens"] is None else kwargs["prompt_tokens"].shape[1]
    assert item.frames == flow.mel_frames(n_prompt + tokens.shape[1], kwargs["finalize"])
    assert_feature(ps, f"flow_{case}_mu", item.mu)
    for stage, value in (("cond", item.cond), ("noise", item.z)):
        if f"flow_{case}_{stage}" in ps.arrays:
            assert_close(ps, f"flow_{case}_{stage}", value, ps.t(f"flow_{case}_{stage}"), 0.0)
    mel = flow.decode([item])[0]
    assert_close(ps, f"flow_{case}_mel", mel, ps.t(f"flow_{case}_mel"), ATOL_MEL)
    # The one-call API gives the same mel.
    again = flow.inference(tokens, **kwargs)
    assert torch.equal(again, mel)


@pytest.mark.parametrize("case", ["ns", "chunk"])
def test_batched_decode_matches_solo(parity_set: ParitySet, case: str) -> None:
    """Two equal-length requests in one estimator batch of 4 give their solo results."""
    ps = parity_set
    flow = load_flow(ps)
    kwargs = case_inputs(ps, case)
    flags = (kwargs["streaming"], kwargs["finalize"])
    tokens = ps.t(f"flow_{case}_tokens")
    a = flow.prepare(tokens, None, None, kwargs["embedding"], *flags)
    b = flow.prepare(tokens.flip(1), None, None, ps.t("flow_zs_embedding"), *flags)
    mel_a, mel_b = flow.decode([a, b])
    assert_close(ps, f"flow_{case}_mel (batched)", mel_a, ps.t(f"flow_{case}_mel"), ATOL_MEL)
    solo_b = flow.decode([b])[0]
    assert torch.allclose(mel_b, solo_b, rtol=0, atol=1e-5)
    assert not torch.allclose(mel_a, mel_b, atol=1e-2)


def test_streaming_and_full_calls_do_not_share_a_loop(parity_set: ParitySet) -> None:
    ps = parity_set
    flow = load_flow(ps)
    tokens, emb = ps.t("flow_chunk_tokens"), ps.t("spk_embedding")
    streamed = flow.prepare(tokens, None, None, emb, streaming=True, finalize=False)
    full = flow.prepare(tokens, None, None, emb, streaming=False, finalize=False)
    with pytest.raises(ValueError, match="cannot share"):
        flow.decode([streamed, full])


def test_streaming_calls_never_use_the_full_attention_runner(parity_set: ParitySet) -> None:
    """`estimator_runner` (what the official ONNX file computes) serves full-attention calls only;
    streaming calls use `streaming_estimator_runner`, else the PyTorch estimator."""
    ps = parity_set
    flow = load_flow(ps)
    cfm = flow.decoder
    calls: list[str] = []

    def full_runner(*args: torch.Tensor) -> torch.Tensor:
        calls.append("full")
        return cfm.estimator(*args)

    def streaming_runner(*args: torch.Tensor) -> torch.Tensor:
        calls.append("streaming")
        return cfm.estimator(*args, streaming=True)

    kwargs = case_inputs(ps, "chunk")
    tokens = ps.t("flow_chunk_tokens")
    cfm.estimator_runner = full_runner
    try:
        mel = flow.inference(tokens, **kwargs)
        assert calls == []
        assert_close(ps, "flow_chunk_mel (full runner set)", mel, ps.t("flow_chunk_mel"), ATOL_MEL)
        cfm.streaming_estimator_runner = streaming_runner
        mel = flow.inference(tokens, **kwargs)
        assert calls == ["streaming"] * ps.arrays["flow_ns_est_t"].shape[0]
        assert_close(ps, "flow_chunk_mel (streaming runner)", mel, ps.t("flow_chunk_mel"), ATOL_MEL)
    finally:
        cfm.estimator_runner = None
        cfm.streaming_estimator_runner = None
