"""Parity of the flow (tokens -> mel) against upstream recordings: every `flow_*`, `est_*`,
`speed_flow_*` and `stream_cK_flow_*` array of each parity set. Tolerances from the set's README."""

from __future__ import annotations

import re

import pytest
import torch

from cosyserve.families.cosyvoice1.flow import MaskedDiffWithXvec
from tests.helpers.parity import ParitySet, assert_close

pytestmark = pytest.mark.parity

ATOL_FEATURE = 1e-5  # encoder outputs, mu, spks
ATOL_ESTIMATOR = 1e-4
ATOL_MEL = 2e-4

_FLOWS: dict[str, MaskedDiffWithXvec] = {}


def load_flow(ps: ParitySet) -> MaskedDiffWithXvec:
    """The set's flow with its `flow.pt` loaded strictly (built once per set)."""
    if ps.name not in _FLOWS:
        flow = MaskedDiffWithXvec(ps.config.flow)
        flow.load_state_dict(torch.load(ps.path / "flow.pt", weights_only=True), strict=True)
        _FLOWS[ps.name] = flow.eval()
    return _FLOWS[ps.name]


def estimator_inputs(ps: ParitySet, prefix: str) -> list[torch.Tensor]:
    return [ps.t(prefix + name) for name in ("x", "mask", "mu", "t", "spks", "cond")]


@pytest.mark.parametrize("call", ["est_call0", "est_free"])
def test_estimator(parity_set: ParitySet, call: str) -> None:
    flow = load_flow(parity_set)
    inputs = estimator_inputs(parity_set, call + "_")
    with torch.inference_mode():
        out = flow.decoder.estimator(*inputs)
    assert_close(parity_set, f"{call}_out", out, parity_set.t(call + "_out"), ATOL_ESTIMATOR)
    # Padded frames must be exactly zero, not merely small.
    mask = inputs[1].expand_as(out)
    assert torch.all(out[mask == 0] == 0)


def test_euler_loop_sft(parity_set: ParitySet) -> None:
    """The CFM alone from the recorded mu: per-step t (bit-exact) and estimator outputs, final mel."""
    ps = parity_set
    cfm = load_flow(ps).decoder
    steps: list[tuple[torch.Tensor, torch.Tensor]] = []

    def recorder(*args: torch.Tensor) -> torch.Tensor:
        out = cfm.estimator(*args)
        steps.append((args[3].clone(), out.clone()))
        return out

    cfm.estimator_runner = recorder
    try:
        mel = cfm.solve_euler(
            ps.t("flow_sft_noise"),
            ps.t("flow_sft_mu"),
            ps.t("flow_sft_mask"),
            ps.t("flow_sft_spks"),
            ps.t("flow_sft_cond"),
        )
    finally:
        cfm.estimator_runner = None
    assert_close(ps, "flow_sft_est_t", torch.stack([s[0] for s in steps]), ps.t("flow_sft_est_t"), 0.0)
    assert_close(
        ps, "flow_sft_est_dphi", torch.stack([s[1] for s in steps]), ps.t("flow_sft_est_dphi"), ATOL_ESTIMATOR
    )
    assert_close(ps, "flow_sft_mel (from mu)", mel, ps.t("flow_sft_mel"), ATOL_MEL)


def test_encoder_and_spks(parity_set: ParitySet) -> None:
    ps = parity_set
    flow = load_flow(ps)
    with torch.inference_mode():
        spks = flow.speaker_projection(ps.t("spk_embedding"))
        raw = flow.encode(ps.t("flow_sft_tokens"))
        out = flow.encoder_proj(raw)
    assert_close(ps, "flow_sft_spks", spks, ps.t("flow_sft_spks"), ATOL_FEATURE)
    assert_close(ps, "flow_sft_encoder_raw", raw, ps.t("flow_sft_encoder_raw"), ATOL_FEATURE)
    assert_close(ps, "flow_sft_encoder_out", out, ps.t("flow_sft_encoder_out"), ATOL_FEATURE)
    with torch.inference_mode():
        zs_tokens = torch.cat([ps.t("flow_zs_prompt_tokens"), ps.t("flow_zs_tokens")], dim=1)
        zs_out = flow.encoder_proj(flow.encode(zs_tokens))
    assert_close(ps, "flow_zs_encoder_out", zs_out, ps.t("flow_zs_encoder_out"), ATOL_FEATURE)


@pytest.mark.parametrize("case", ["sft", "short", "zs"])
def test_flow_inference(parity_set: ParitySet, case: str) -> None:
    """Tokens (+ prompt) -> mu, cond, mel and streaming cache through the public API."""
    ps = parity_set
    flow = load_flow(ps)
    if case == "zs":
        prompt_tokens, prompt_feat = ps.t("flow_zs_prompt_tokens"), ps.t("flow_zs_prompt_feat")
        embedding = ps.t("flow_zs_embedding")
    else:
        prompt_tokens, prompt_feat, embedding = None, None, ps.t("spk_embedding")
    tokens, noise = ps.t(f"flow_{case}_tokens"), ps.t(f"flow_{case}_noise")

    item = flow.prepare(tokens, prompt_tokens, prompt_feat, embedding, noise=noise)
    assert_close(ps, f"flow_{case}_mu", item.mu, ps.t(f"flow_{case}_mu"), ATOL_FEATURE)
    if f"flow_{case}_cond" in ps.arrays:
        assert_close(ps, f"flow_{case}_cond", item.cond, ps.t(f"flow_{case}_cond"), 0.0)

    mel, cache = flow.inference(tokens, prompt_tokens, prompt_feat, embedding, noise=noise)
    assert_close(ps, f"flow_{case}_mel", mel, ps.t(f"flow_{case}_mel"), ATOL_MEL)
    if f"flow_{case}_cache_out" in ps.arrays:
        assert_close(ps, f"flow_{case}_cache_out", cache, ps.t(f"flow_{case}_cache_out"), ATOL_FEATURE)


def test_speed_flow(parity_set: ParitySet) -> None:
    ps = parity_set
    if "speed_tokens" not in ps.arrays:
        pytest.skip("set has no speed_* arrays")
    mel, _ = load_flow(ps).inference(
        ps.t("speed_tokens"), embedding=ps.t("spk_embedding"), noise=ps.t("speed_flow_noise")
    )
    assert_close(ps, "speed_flow_mel", mel, ps.t("speed_flow_mel"), ATOL_MEL)


def test_stream_flow_chunks(parity_set: ParitySet) -> None:
    """Every recorded streaming chunk: tokens + cache_in + noise -> mel and cache_out."""
    ps = parity_set
    chunks = sorted(int(m.group(1)) for k in ps.arrays if (m := re.fullmatch(r"stream_c(\d+)_tokens", k)))
    if not chunks:
        pytest.skip("set has no stream_* arrays")
    flow = load_flow(ps)
    for k in chunks:
        p = f"stream_c{k}_flow_"
        mel, cache = flow.inference(
            ps.t(f"stream_c{k}_tokens"),
            embedding=ps.t("spk_embedding"),
            flow_cache=ps.t(p + "cache_in"),
            noise=ps.t(p + "noise"),
        )
        assert_close(ps, p + "mel", mel, ps.t(p + "mel"), ATOL_MEL)
        assert_close(ps, p + "cache_out", cache, ps.t(p + "cache_out"), ATOL_FEATURE)


def test_batched_decode_matches_solo(parity_set: ParitySet) -> None:
    """Two equal-length requests in one estimator batch of 4 give their solo results."""
    ps = parity_set
    flow = load_flow(ps)
    emb, tokens = ps.t("spk_embedding"), ps.t("flow_sft_tokens")
    a = flow.prepare(tokens, None, None, emb, noise=ps.t("flow_sft_noise"))
    b = flow.prepare(tokens, None, None, emb, generator=torch.Generator().manual_seed(7))
    mel_a, mel_b = flow.decode([a, b])
    assert_close(ps, "flow_sft_mel (batched)", mel_a, ps.t("flow_sft_mel"), ATOL_MEL)
    solo_b = flow.decode([b])[0]
    assert torch.allclose(mel_b, solo_b, atol=ATOL_MEL)
