"""Sampling behaviour of the LLM: seeded generators, EOS masking, length limits, forced length,
the repetition-aware redraw, and the nucleus walk against a plain loop transcription of it."""

from __future__ import annotations

import pytest
import torch

from cosyserve.families.cosyvoice1.config import LLMConfig
from cosyserve.families.cosyvoice1.llm import TokenSampler, TransformerLM, length_limits
from cosyserve.nn.config import EncoderConfig, SamplingConfig
from cosyserve.nn.sampling import nucleus_sample, ras_sampling

VOCAB = 64  # speech tokens of the tiny model; EOS = 64


def _tiny_config() -> LLMConfig:
    def enc(inp: int, layer: str, act: str, block: str) -> EncoderConfig:
        return EncoderConfig(
            input_size=inp,
            output_size=32,
            attention_heads=2,
            linear_units=64,
            num_blocks=2,
            input_layer=layer,
            activation=act,
            block_type=block,
            causal=True,
        )

    return LLMConfig(
        text_encoder_input_size=16,
        llm_input_size=24,
        llm_output_size=32,
        text_token_size=100,
        speech_token_size=VOCAB,
        text_encoder=enc(16, "linear", "swish", "conformer"),
        llm=enc(24, "linear_legacy", "relu", "transformer"),
    )


@pytest.fixture(scope="module")
def tiny_lm() -> TransformerLM:
    torch.manual_seed(123)
    return TransformerLM(_tiny_config()).eval()


def _with_eos_bias(lm: TransformerLM, bias: float) -> TransformerLM:
    clone = TransformerLM(lm.cfg).eval()
    clone.load_state_dict(lm.state_dict())
    with torch.no_grad():
        clone.llm_decoder.bias[lm.eos_id] = bias
    return clone


TEXT = torch.tensor([3, 14, 15, 92, 65])
EMB = torch.randn(1, 192, generator=torch.Generator().manual_seed(7))


def test_same_seed_same_tokens(tiny_lm: TransformerLM) -> None:
    a = list(tiny_lm.generate(TEXT, embedding=EMB, generator=1234, num_tokens=40))
    b = list(
        tiny_lm.generate(TEXT, embedding=EMB, generator=torch.Generator().manual_seed(1234), num_tokens=40)
    )
    c = list(tiny_lm.generate(TEXT, embedding=EMB, generator=4321, num_tokens=40))
    assert a == b
    assert a != c
    assert all(0 <= t < VOCAB for t in a)


def test_global_rng_untouched(tiny_lm: TransformerLM) -> None:
    torch.manual_seed(99)
    state = torch.get_rng_state()
    list(tiny_lm.generate(TEXT, embedding=EMB, generator=5, num_tokens=20))
    list(tiny_lm.generate(TEXT, embedding=EMB, num_tokens=5))  # no seed: fresh generator, still not global
    assert torch.equal(torch.get_rng_state(), state)


def test_default_limits_follow_text_length(tiny_lm: TransformerLM) -> None:
    lo, hi = length_limits(len(TEXT), tiny_lm.cfg)
    assert (lo, hi) == (10, 100)
    eager_eos = _with_eos_bias(tiny_lm, 50.0)  # EOS wins whenever it is allowed
    assert len(list(eager_eos.generate(TEXT, embedding=EMB, generator=0))) == lo
    # The prompt text does not count towards the limits.
    prompt = torch.tensor([1, 2, 3, 4, 5, 6, 7])
    assert len(list(eager_eos.generate(TEXT, prompt_text_ids=prompt, generator=0))) == lo
    never_eos = _with_eos_bias(tiny_lm, -1e4)
    assert len(list(never_eos.generate(TEXT, embedding=EMB, generator=0))) == hi


def test_forced_token_count(tiny_lm: TransformerLM) -> None:
    eager_eos = _with_eos_bias(tiny_lm, 50.0)
    never_eos = _with_eos_bias(tiny_lm, -1e4)
    for model in (eager_eos, never_eos):
        tokens = list(model.generate(TEXT, embedding=EMB, generator=3, num_tokens=37))
        assert len(tokens) == 37
        assert all(0 <= t < VOCAB for t in tokens)
    assert list(tiny_lm.generate(TEXT, generator=3, num_tokens=0)) == []


def test_generate_is_lazy(tiny_lm: TransformerLM) -> None:
    """A streaming consumer gets tokens one by one and the stream is a plain generator."""
    stream = tiny_lm.generate(TEXT, embedding=EMB, generator=11, num_tokens=5)
    first = next(stream)
    rest = list(stream)
    assert [first, *rest] == list(tiny_lm.generate(TEXT, embedding=EMB, generator=11, num_tokens=5))


def test_sampler_eos_masked_until_min_len() -> None:
    logp = torch.full((VOCAB + 1,), -30.0)
    logp[VOCAB] = 0.0  # EOS has almost all the mass
    logp[5] = -1.0
    sampler = TokenSampler(VOCAB, min_len=3, max_len=50, generator=0)
    emitted = [sampler.choose(logp) for _ in range(3)]
    assert all(t is not None and t != VOCAB for t in emitted)
    assert sampler.choose(logp) is None and sampler.finished
    assert sampler.choose(logp) is None
    assert sampler.tokens == emitted


def test_sampler_stops_at_max_len() -> None:
    logp = torch.log_softmax(torch.randn(VOCAB + 1, generator=torch.Generator().manual_seed(1)), 0)
    logp[VOCAB] = float("-inf")
    sampler = TokenSampler(VOCAB, min_len=0, max_len=7, generator=0)
    out = [sampler.choose(logp) for _ in range(9)]
    assert all(t is not None for t in out[:7]) and out[7:] == [None, None]


def test_repetition_redraw() -> None:
    """A dominant token is emitted at most once per window of 10; the redraw excludes it."""
    logp = torch.full((VOCAB + 1,), -8.0)
    logp[7] = 0.0
    logp = torch.log_softmax(logp, 0)
    before = logp.clone()
    sampler = TokenSampler(VOCAB, min_len=100, max_len=100, generator=0)
    tokens = [sampler.choose(logp) for _ in range(100)]
    assert torch.equal(logp, before)  # the caller's row is never modified
    for i, t in enumerate(tokens):
        if t == 7:
            assert 7 not in tokens[max(0, i - 10) : i], f"token 7 repeated within the window at {i}"
    assert tokens.count(7) >= 9  # still chosen whenever the window allows it
    assert VOCAB not in tokens  # EOS masked (min_len) in the redraw too


def _reference_ras(logp: torch.Tensor, decoded: list[int], gen: torch.Generator, cfg: SamplingConfig) -> int:
    """Literal transcription of the README's walk (one element at a time, float32 running sum)."""
    probs, order = logp.softmax(dim=0).sort(descending=True, stable=True)
    taken_p, taken_i = [], []
    cum = torch.zeros((), dtype=torch.float32)
    for p, i in zip(probs, order, strict=True):
        if cum < cfg.top_p and len(taken_p) < cfg.top_k:
            cum = cum + p
            taken_p.append(p)
            taken_i.append(int(i))
        else:
            break
    token = taken_i[int(torch.multinomial(torch.stack(taken_p), 1, replacement=True, generator=gen))]
    if sum(t == token for t in decoded[-cfg.win_size :]) >= cfg.win_size * cfg.tau_r:
        logp = logp.clone()
        logp[token] = float("-inf")
        token = int(torch.multinomial(logp.softmax(dim=0), 1, replacement=True, generator=gen))
    return token


@pytest.mark.parametrize("temperature", [0.3, 1.0, 3.0])
def test_ras_sampling_matches_reference_loop(temperature: float) -> None:
    cfg = SamplingConfig()
    data = torch.Generator().manual_seed(42)
    for trial in range(40):
        logp = torch.log_softmax(torch.randn(4097, generator=data) * temperature * 4, 0)
        decoded = torch.randint(0, 4096, (12,), generator=data).tolist()
        if trial % 3 == 0:  # make a repeat likely
            decoded[-1] = int(logp.argmax())
        ours = ras_sampling(logp, decoded, torch.Generator().manual_seed(trial), cfg)
        ref = _reference_ras(logp, decoded, torch.Generator().manual_seed(trial), cfg)
        assert ours == ref, f"trial {trial}"


def test_nucleus_boundary_and_top_k() -> None:
    # 0.6 + 0.15 < 0.8, so the third entry is taken (crossing 0.8) and the walk stops there.
    probs = torch.tensor([0.6, 0.15, 0.1, 0.1, 0.05])
    seen = {nucleus_sample(probs.log(), 0.8, 25, torch.Generator().manual_seed(s)) for s in range(300)}
    assert seen == {0, 1, 2}
    seen = {nucleus_sample(probs.log(), 0.8, 2, torch.Generator().manual_seed(s)) for s in range(300)}
    assert seen == {0, 1}
    flat = torch.zeros(100)  # uniform: top_k caps the candidates at the 25 first (stable sort)
    seen = {nucleus_sample(flat, 0.8, 25, torch.Generator().manual_seed(s)) for s in range(400)}
    assert seen <= set(range(25)) and len(seen) > 15


def test_top_k_equals_the_stable_sort_even_with_ties() -> None:
    from cosyserve.nn.sampling import _top_k_stable

    data = torch.Generator().manual_seed(3)
    rows = [torch.randn(4097, generator=data).softmax(0) for _ in range(5)]
    tied = torch.zeros(4097)
    tied[[7, 3, 900, 11]] = 0.2  # four-way tie across the k boundary (k=2): lower indices win
    tied[[5, 6]] = 0.1
    rows += [tied, torch.full((10,), 0.1), torch.tensor([0.5, 0.5])]
    for probs in rows:
        for k in (1, 2, 25, probs.numel(), probs.numel() + 3):
            values, order = probs.sort(descending=True, stable=True)
            got_values, got_order = _top_k_stable(probs, k)
            assert torch.equal(got_order, order[:k]) and torch.equal(got_values, values[:k])
