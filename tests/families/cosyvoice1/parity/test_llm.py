"""LLM parity: text encoder, prefixes, hidden states and per-step log-probs through the KV cache,
against the upstream recordings of every parity set (tolerances from the set's README)."""

from __future__ import annotations

import pytest
import torch

from cosyserve.families.cosyvoice1.llm import TransformerLM
from cosyserve.nn.config import EncoderConfig
from cosyserve.nn.conformer import Encoder, KVCache, rel_position_table
from tests.helpers.parity import ParitySet, assert_close

pytestmark = pytest.mark.parity

ATOL = 1e-4  # README: LLM lm_input, text encoder, hidden and log-probs
TOP_K = 25


@pytest.fixture(scope="module")
def lm(parity_set: ParitySet) -> TransformerLM:
    model = TransformerLM(parity_set.config.llm)
    state = torch.load(parity_set.path / "llm.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _case(ps: ParitySet, case: str) -> dict:
    """Inputs of one recorded case: sft, zs (zero-shot) or noemb (no speaker embedding)."""
    text = ps.t("llm_text_ids")
    if case == "sft":
        return dict(
            prefix="llm_lm_input",
            logp="llm_logp",
            teacher=ps.t("llm_teacher_tokens"),
            kwargs=dict(text_ids=text, embedding=ps.t("spk_embedding")),
        )
    if case == "zs":
        return dict(
            prefix="llm_zs_lm_input",
            logp="llm_zs_logp",
            teacher=ps.t("llm_zs_teacher_tokens"),
            kwargs=dict(
                text_ids=text,
                prompt_text_ids=ps.t("llm_zs_prompt_text_ids"),
                prompt_speech_tokens=ps.t("llm_zs_prompt_speech_tokens"),
                embedding=ps.t("llm_zs_embedding"),
            ),
        )
    assert case == "noemb"
    return dict(
        prefix="llm_noemb_lm_input",
        logp="llm_noemb_logp",
        teacher=ps.t("llm_noemb_teacher_tokens"),
        kwargs=dict(
            text_ids=text,
            prompt_text_ids=ps.t("llm_zs_prompt_text_ids"),
            embedding=torch.zeros(0, ps.config.llm.spk_embed_dim),
        ),
    )


def _incremental(
    lm: TransformerLM, prefix: torch.Tensor, teacher: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced KV-cache decoding: (hidden `[N+1, d]`, log-probs `[N+1, V]`), one row per step."""
    cache = lm.new_cache(1, capacity=8)  # small on purpose: exercises cache growth
    hidden = [lm.prefill_hidden(prefix, cache)]
    for token in teacher.tolist():
        hidden.append(lm.step_hidden(torch.tensor([token]), cache))
    rows = torch.cat(hidden)
    # Per-row decoder application, as upstream (a batched matmul differs by ~3e-6).
    return rows, torch.cat([lm.log_probs(h.unsqueeze(0)) for h in rows])


def _check_rankings(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert torch.equal(actual.argmax(-1), expected.argmax(-1)), f"{name}: argmax differs"
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        got = set(a.topk(TOP_K).indices.tolist())
        want = set(e.topk(TOP_K).indices.tolist())
        assert got == want, f"{name} row {i}: top-{TOP_K} sets differ by {sorted(got ^ want)}"


@torch.inference_mode()
def test_text_encoder(parity_set: ParitySet, lm: TransformerLM) -> None:
    ids = parity_set.t("llm_text_ids").unsqueeze(0)
    raw, _ = lm.text_encoder(lm.text_embedding(ids))
    assert_close(parity_set, "llm_text_encoder_raw", raw, parity_set.t("llm_text_encoder_raw"), ATOL)
    out = lm.text_encoder_affine_layer(raw)
    assert_close(parity_set, "llm_text_encoder_out", out, parity_set.t("llm_text_encoder_out"), ATOL)
    assert_close(parity_set, "llm_text_encoder_out (encode_text)", lm.encode_text(ids[0]), out, 0.0)


@torch.inference_mode()
@pytest.mark.parametrize("case", ["sft", "zs", "noemb"])
def test_lm_input(parity_set: ParitySet, lm: TransformerLM, case: str) -> None:
    c = _case(parity_set, case)
    prefix = lm.build_prefix(**c["kwargs"])
    assert_close(parity_set, c["prefix"], prefix, parity_set.t(c["prefix"]), ATOL)


@torch.inference_mode()
@pytest.mark.parametrize("case", ["sft", "zs", "noemb"])
def test_logp_incremental(parity_set: ParitySet, lm: TransformerLM, case: str) -> None:
    c = _case(parity_set, case)
    prefix = lm.build_prefix(**c["kwargs"])
    hidden, logp = _incremental(lm, prefix, c["teacher"])
    if case == "sft":
        assert_close(parity_set, "llm_hidden", hidden, parity_set.t("llm_hidden"), ATOL)
    expected = parity_set.t(c["logp"])
    assert_close(parity_set, c["logp"], logp, expected, ATOL)
    _check_rankings(c["logp"], logp, expected)


@torch.inference_mode()
def test_full_sequence_matches_incremental(parity_set: ParitySet, lm: TransformerLM) -> None:
    c = _case(parity_set, "zs")
    prefix = lm.build_prefix(**c["kwargs"])
    teacher = c["teacher"]
    inc_hidden, _ = _incremental(lm, prefix, teacher)
    seq = torch.cat([prefix, lm.speech_embedding(teacher.unsqueeze(0))], dim=1)
    full, _ = lm.llm(seq)
    full_rows = full[0, prefix.shape[1] - 1 :]
    assert_close(parity_set, "llm full-seq vs incremental hidden", full_rows, inc_hidden, 2e-5)
    # One chunk with the prefix and all teacher tokens through the cache path, too.
    cache = lm.new_cache(1)
    chunk = lm.llm.forward_chunk(seq, cache)[0, prefix.shape[1] - 1 :]
    assert_close(parity_set, "llm one-chunk vs incremental hidden", chunk, inc_hidden, 2e-5)
    logp = lm.log_probs(full_rows)
    assert_close(parity_set, "llm_zs_logp (full sequence)", logp, parity_set.t("llm_zs_logp"), ATOL)
    _check_rankings("llm_zs_logp (full sequence)", logp, parity_set.t("llm_zs_logp"))


@torch.inference_mode()
@pytest.mark.parametrize("mode", ["stack", "left_padded_prefill"])
def test_ragged_batch_decode(parity_set: ParitySet, lm: TransformerLM, mode: str) -> None:
    """Three requests of different prefix lengths decoded as one batch give their own rows."""
    cases = [_case(parity_set, name) for name in ("sft", "zs", "noemb")]
    prefixes = [lm.build_prefix(**c["kwargs"]) for c in cases]
    if mode == "stack":
        caches, first = [], []
        for prefix in prefixes:
            cache = lm.new_cache(1, capacity=prefix.shape[1])
            first.append(lm.log_probs(lm.prefill_hidden(prefix, cache)))
            caches.append(cache)
        cache = KVCache.stack(caches, extra_capacity=4)
        logp0 = torch.cat(first)
    else:
        longest = max(p.shape[1] for p in prefixes)
        pad = [longest - p.shape[1] for p in prefixes]
        batch = torch.cat(
            [torch.nn.functional.pad(p, (0, 0, n, 0)) for p, n in zip(prefixes, pad, strict=True)]
        )
        cache = lm.new_cache(len(prefixes), capacity=longest + 4, pad=pad)
        logp0 = lm.log_probs(lm.prefill_hidden(batch, cache))
    rows = [[r] for r in logp0]
    steps = min(len(c["teacher"]) for c in cases) - 1  # keep one token for the select check
    for i in range(steps):
        tokens = torch.stack([c["teacher"][i] for c in cases])
        for r, row in zip(rows, lm.decode_step(tokens, cache), strict=True):
            r.append(row)
    for c, r in zip(cases, rows, strict=True):
        expected = parity_set.t(c["logp"])[: steps + 1]
        assert_close(parity_set, f"{c['logp']} (ragged batch, {mode})", torch.stack(r), expected, ATOL)
    # Dropping a finished row keeps the others exact.
    sub = cache.select([2, 0])
    out = lm.decode_step(torch.stack([cases[2]["teacher"][steps], cases[0]["teacher"][steps]]), sub)
    expected = torch.stack(
        [parity_set.t(cases[2]["logp"])[steps + 1], parity_set.t(cases[0]["logp"])[steps + 1]]
    )
    assert_close(parity_set, f"llm_logp after select (ragged batch, {mode})", out, expected, ATOL)


@torch.inference_mode()
def test_flow_encoder_full_attention(parity_set: ParitySet) -> None:
    """The same Encoder with full attention (the flow's), incl. a right-padded batch row."""
    cfg = parity_set.config.flow
    state = torch.load(parity_set.path / "flow.pt", map_location="cpu", weights_only=True)
    encoder = Encoder(cfg.encoder).eval()
    encoder.load_state_dict({k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")})
    tokens = parity_set.t("flow_sft_tokens")
    x = torch.nn.functional.embedding(tokens.clamp(min=0), state["input_embedding.weight"])
    out, valid = encoder(x, torch.tensor([x.shape[1]]))
    assert bool(valid.all())
    assert_close(
        parity_set,
        "flow_sft_encoder_raw (transformer.Encoder)",
        out,
        parity_set.t("flow_sft_encoder_raw"),
        1e-5,
    )
    # Batch of two: the full sequence and a shorter one padded on the right.
    short = x.shape[1] * 2 // 3
    batch = torch.cat([x, torch.nn.functional.pad(x[:, :short], (0, 0, 0, x.shape[1] - short), value=3.0)])
    out2, _ = encoder(batch, torch.tensor([x.shape[1], short]))
    alone, _ = encoder(x[:, :short])
    assert_close(parity_set, "flow encoder padded batch row 0", out2[:1], out, 1e-5)
    assert_close(parity_set, "flow encoder padded batch row 1", out2[1:, :short], alone, 1e-5)


# -- the encoder against a direct transcription of the README formula (no fixtures needed) ------


def _naive_encoder(enc: Encoder, xs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Scores ((q+u).k_j + (q+v).P[i-j]) / sqrt(d_k), P from the table row by row, explicit masks."""
    batch, total, _ = xs.shape
    d = enc.cfg.output_size
    pos = torch.arange(total)
    rel = pos.unsqueeze(1) - pos.unsqueeze(0)  # i - j
    table = torch.cat(
        [rel_position_table(r, r, d) for r in range(total - 1, -total, -1)]
    )  # r = T-1 .. -(T-1)
    allowed = valid[:, None, None, :] & (rel >= 0 if enc.causal else torch.ones_like(rel, dtype=torch.bool))
    x = enc.embed(xs)
    for layer in enc.encoders:
        att = layer.self_attn
        h, dk = att.h, att.d_k
        y = layer._modules[layer._norm_names[0]](x)
        q = att.linear_q(y).view(batch, total, h, dk)
        k = att.linear_k(y).view(batch, total, h, dk)
        v = att.linear_v(y).view(batch, total, h, dk)
        p = att.linear_pos(table).view(-1, h, dk)[(total - 1) - rel]  # [T, T, h, dk]: P[i - j]
        ac = torch.einsum("bihd,bjhd->bhij", q + att.pos_bias_u, k)
        bd = torch.einsum("bihd,ijhd->bhij", q + att.pos_bias_v, p)
        scores = ((ac + bd) / dk**0.5).masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, -1).nan_to_num(0.0)
        o = torch.einsum("bhij,bjhd->bihd", probs, v).reshape(batch, total, d)
        x = x + att.linear_out(o)
        x = x + layer.feed_forward(layer._modules[layer._norm_names[1]](x))
    return enc.after_norm(x)


def _small_encoder(causal: bool, block: str) -> Encoder:
    torch.manual_seed(0)
    cfg = EncoderConfig(
        input_size=12,
        output_size=16,
        attention_heads=2,
        linear_units=24,
        num_blocks=2,
        input_layer="linear_legacy" if block == "transformer" else "linear",
        activation="relu" if block == "transformer" else "swish",
        block_type=block,
        causal=causal,
    )
    return Encoder(cfg).eval()


@torch.inference_mode()
@pytest.mark.parametrize("causal", [False, True])
def test_encoder_matches_naive_formula(causal: bool) -> None:
    enc = _small_encoder(causal, "conformer")
    xs = torch.randn(2, 9, 12)
    lengths = torch.tensor([9, 6])
    valid = torch.arange(9).unsqueeze(0) < lengths.unsqueeze(1)
    out, _ = enc(xs, lengths)
    ref = _naive_encoder(enc, xs, valid)
    err = (out - ref)[valid].abs().max().item()
    assert err < 1e-5, f"encoder vs naive formula: {err:.3g}"
    # New weights must invalidate the cached linear_pos(table) projection.
    torch.manual_seed(1)
    enc.load_state_dict(type(enc)(enc.cfg).state_dict())
    out, _ = enc(xs, lengths)
    err = (out - _naive_encoder(enc, xs, valid))[valid].abs().max().item()
    assert err < 1e-5, f"encoder vs naive formula after load_state_dict: {err:.3g}"


@torch.inference_mode()
def test_chunked_cache_matches_naive_formula() -> None:
    """Left-padded ragged batch fed in chunks of 3, 1, 4, 1 positions through the KV cache."""
    enc = _small_encoder(True, "transformer")
    total, pad = 9, [0, 4]
    xs = torch.randn(2, total, 12)
    cache = enc.new_cache(2, capacity=2, pad=pad)  # tiny capacity: growth in the middle
    outs, start = [], 0
    for n in (3, 1, 4, 1):
        outs.append(enc.forward_chunk(xs[:, start : start + n], cache))
        start += n
    out = torch.cat(outs, dim=1)
    for b, p in enumerate(pad):  # each row alone, unpadded
        ref = _naive_encoder(enc, xs[b : b + 1, p:], torch.ones(1, total - p, dtype=torch.bool))
        err = (out[b, p:] - ref[0]).abs().max().item()
        assert err < 1e-5, f"row {b}: chunked cache vs naive formula: {err:.3g}"
    assert cache.seq_lengths.tolist() == [total - p for p in pad]
