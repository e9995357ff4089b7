"""Parity of the CosyVoice3 flow (tokens -> mel) against upstream recordings: every `flow_*` array of
each parity set (non-stream, zero-shot, streaming chunk), the Euler loop step by step, batching
and the estimator hook. Tolerances from the set's README: mel 2e-4 (1e-3 for a streaming chunk),
DiT calls 1e-4, t per step bit-exact."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from cosyserve.errors import ModelDirectoryError
from cosyserve.families.cosyvoice3.flow import CausalMaskedDiffWithDiT, load_flow
from tests.helpers.parity import ParitySet, assert_close

pytestmark = [pytest.mark.parity, pytest.mark.timeout(300)]

ATOL_EXACT = 0.0  # embeddings, lookahead, mu, cond, noise: the same float operations
ATOL_FEATURE = 1e-5  # the v1 spec's encoder / mu / spks tolerance (1e-6 failed on an AVX-512 host)
ATOL_ESTIMATOR = 1e-4
ATOL_MEL = 2e-4
ATOL_STREAM_MEL = 1e-3

_FLOWS: dict[str, CausalMaskedDiffWithDiT] = {}


def load_set_flow(ps: ParitySet) -> CausalMaskedDiffWithDiT:
    """The set's flow with its `flow.pt` loaded strictly (built once per set)."""
    if ps.name not in _FLOWS:
        flow = CausalMaskedDiffWithDiT(ps.config.flow)
        flow.load_state_dict(torch.load(ps.path / "flow.pt", weights_only=True), strict=True)
        _FLOWS[ps.name] = flow.eval()
    return _FLOWS[ps.name]


def test_token_side(parity_set: ParitySet) -> None:
    """spks, token embedding, lookahead (finalize: zeros after the end), mu, mask, cond, noise."""
    ps = parity_set
    flow = load_set_flow(ps)
    tokens, embedding = ps.t("flow_ns_tokens"), ps.t("flow_embedding")
    with torch.inference_mode():
        emb = flow.embed_tokens(tokens)
        assert_close(
            ps, "flow_ns_spks", flow.speaker_projection(embedding), ps.t("flow_ns_spks"), ATOL_FEATURE
        )
        assert_close(ps, "flow_ns_tok_emb", emb, ps.t("flow_ns_tok_emb"), ATOL_EXACT)
        look = flow.lookahead(emb, finalize=True)
        assert_close(ps, "flow_ns_lookahead_out", look, ps.t("flow_ns_lookahead_out"), ATOL_FEATURE)
        item = flow.prepare(tokens, None, None, embedding)
    assert_close(ps, "flow_ns_mu", item.mu, ps.t("flow_ns_mu"), ATOL_FEATURE)
    assert_close(ps, "flow_ns_cond", item.cond, ps.t("flow_ns_cond"), ATOL_EXACT)
    assert_close(ps, "flow_ns_noise", item.z, ps.t("flow_ns_noise"), ATOL_EXACT)
    assert_close(ps, "flow_ns_mask", torch.ones_like(item.mu[:, :1]), ps.t("flow_ns_mask"), ATOL_EXACT)


def _recorded_steps(ps: ParitySet) -> list[int] | None:
    desc = ps.manifest["arrays"]["flow_ns_est_dphi"]["desc"]
    found = re.search(r"steps ([\d,]+)", desc)
    return [int(s) for s in found.group(1).split(",")] if found else None


def test_euler_loop(parity_set: ParitySet) -> None:
    """The CFM from the recorded mu: t per step (bit-exact), the estimator outputs at the recorded
    steps, the final mel; the estimator runs through the runner hook (a recorder)."""
    ps = parity_set
    flow = load_set_flow(ps)
    cfm = flow.decoder
    calls: list[tuple[torch.Tensor, torch.Tensor, dict]] = []

    def recorder(*args: torch.Tensor, **kwargs: bool) -> torch.Tensor:
        out = cfm.estimator(*args, **kwargs)
        calls.append((args[3].clone(), out.clone(), kwargs))
        return out

    cfm.estimator_runner = recorder
    try:
        mel = cfm.solve_euler(
            ps.t("flow_ns_noise"),
            ps.t("flow_ns_mu"),
            ps.t("flow_ns_mask"),
            ps.t("flow_ns_spks"),
            ps.t("flow_ns_cond"),
            streaming=False,
        )
    finally:
        cfm.estimator_runner = None
    assert all(kwargs == {} for _, _, kwargs in calls), "non-streaming calls pass 6 arguments"
    assert_close(ps, "flow_ns_est_t", torch.stack([c[0] for c in calls]), ps.t("flow_ns_est_t"), 0.0)
    steps = _recorded_steps(ps)
    if steps is not None:
        dphi = torch.stack([calls[s][1] for s in steps])
        assert_close(ps, "flow_ns_est_dphi", dphi, ps.t("flow_ns_est_dphi"), ATOL_ESTIMATOR)
    assert_close(ps, "flow_ns_mel (from mu)", mel, ps.t("flow_ns_mel"), ATOL_MEL)


def test_non_stream(parity_set: ParitySet) -> None:
    ps = parity_set
    flow = load_set_flow(ps)
    mel = flow.inference(ps.t("flow_ns_tokens"), embedding=ps.t("flow_embedding"))
    assert_close(ps, "flow_ns_mel", mel, ps.t("flow_ns_mel"), ATOL_MEL)


def test_zero_shot(parity_set: ParitySet) -> None:
    ps = parity_set
    flow = load_set_flow(ps)
    args = (
        ps.t("flow_zs_tokens"),
        ps.t("flow_zs_prompt_tokens"),
        ps.t("flow_zs_prompt_feat"),
        ps.t("flow_embedding"),
    )
    item = flow.prepare(*args)
    assert_close(ps, "flow_zs_mu", item.mu, ps.t("flow_zs_mu"), ATOL_FEATURE)
    assert_close(ps, "flow_zs_cond", item.cond, ps.t("flow_zs_cond"), ATOL_EXACT)
    assert_close(ps, "flow_zs_mel", flow.inference(*args), ps.t("flow_zs_mel"), ATOL_MEL)


def test_streaming_chunk(parity_set: ParitySet) -> None:
    """A non-final call: the last 3 tokens are lookahead context, attention is chunk-masked, and
    the estimator hook gets streaming=True."""
    ps = parity_set
    flow = load_set_flow(ps)
    prompt, feat, emb = ps.t("flow_zs_prompt_tokens"), ps.t("flow_zs_prompt_feat"), ps.t("flow_embedding")
    tokens = ps.t("flow_chunk_tokens")
    with torch.inference_mode():
        look = flow.lookahead(flow.embed_tokens(torch.cat([prompt, tokens], dim=1)), finalize=False)
    assert_close(ps, "flow_chunk_lookahead_out", look, ps.t("flow_chunk_lookahead_out"), ATOL_FEATURE)
    item = flow.prepare(tokens, prompt, feat, emb, streaming=True, finalize=False)
    assert_close(ps, "flow_chunk_mu", item.mu, ps.t("flow_chunk_mu"), ATOL_FEATURE)
    flags: list[dict] = []

    def runner(*args: torch.Tensor, **kwargs: bool) -> torch.Tensor:
        flags.append(kwargs)
        return flow.decoder.estimator(*args, **kwargs)

    flow.decoder.estimator_runner = runner
    try:
        mel = flow.decode([item])[0]
    finally:
        flow.decoder.estimator_runner = None
    assert flags and all(f == {"streaming": True} for f in flags)
    assert_close(ps, "flow_chunk_mel", mel, ps.t("flow_chunk_mel"), ATOL_STREAM_MEL)


def test_batched_decode_equals_solo(parity_set: ParitySet) -> None:
    """Requests of different lengths and kinds in one decode call give their solo mels."""
    ps = parity_set
    flow = load_set_flow(ps)
    emb = ps.t("flow_embedding")
    prompt, feat = ps.t("flow_zs_prompt_tokens"), ps.t("flow_zs_prompt_feat")
    items = [
        flow.prepare(ps.t("flow_zs_tokens"), prompt, feat, emb),
        flow.prepare(ps.t("flow_ns_tokens"), None, None, emb),
        flow.prepare(ps.t("flow_chunk_tokens"), prompt, feat, emb, streaming=True, finalize=False),
    ]
    assert len({it.frames for it in items[:2]}) == 2, "the set should give two lengths to pad"
    mels = flow.decode(items)
    for key, mel in zip(("flow_zs_mel", "flow_ns_mel", "flow_chunk_mel"), mels):
        assert_close(ps, f"{key} (batched)", mel, ps.t(key), ATOL_STREAM_MEL if "chunk" in key else ATOL_MEL)
    solo = flow.decode(items[:1])[0]
    torch.testing.assert_close(mels[0], solo, rtol=0, atol=1e-5)


def test_bad_calls_are_refused(parity_set: ParitySet) -> None:
    flow = load_set_flow(parity_set)
    emb = parity_set.t("flow_embedding")
    with pytest.raises(ValueError, match="outside the flow's vocabulary"):
        flow.prepare(torch.tensor([[flow.cfg.vocab_size]]), None, None, emb)
    with pytest.raises(ValueError, match="look-ahead only"):
        flow.prepare(torch.tensor([[1, 2]]), None, None, emb, streaming=True, finalize=False)
    with pytest.raises(ValueError, match="speaker embedding"):
        flow.inference(torch.tensor([[1, 2, 3]]))


def test_checkpoint_loads_strictly(parity_set: ParitySet) -> None:
    """flow.pt's key set is exactly the module's (no noise buffer in either)."""
    flow = load_set_flow(parity_set)
    keys = set(torch.load(parity_set.path / "flow.pt", weights_only=True))
    assert keys == set(flow.state_dict())
    assert not any("rand_noise" in k for k in keys)


def test_load_flow_from_file(parity_set: ParitySet) -> None:
    """The loader (memory-mapped, adopting the checkpoint's tensors) gives the same network; a
    config that does not match the file is one clear ModelDirectoryError."""
    ps = parity_set
    flow = load_flow(ps.path / "flow.pt", ps.config.flow)
    reference = load_set_flow(ps).state_dict()
    assert all(
        torch.equal(v, reference[k]) and v.dtype == torch.float32 for k, v in flow.state_dict().items()
    )
    deeper = dataclasses.replace(
        ps.config.flow, dit=dataclasses.replace(ps.config.flow.dit, depth=ps.config.flow.dit.depth + 1)
    )
    with pytest.raises(ModelDirectoryError, match=r"flow\.pt.*missing keys"):
        load_flow(ps.path / "flow.pt", deeper)
