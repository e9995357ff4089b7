"""CosyVoice2 LLM parity (Qwen2LM): prefixes, hidden states and per-step log-probs of unistream SFT
and zero-shot decoding, and the bistream state machine (text streamed in, 5:15 mix, forced FILL,
the re-fed last speech token) teacher-forced against the upstream recordings of every set.

Every dimension comes from the set (yaml + CosyVoice-BlankEN/config.json + arrays). The helpers at
the top (:class:`TeacherSampler`, :func:`drive`) are shared with the CosyVoice3 tests."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from cosyserve.families.cosyvoice2.llm import (
    BistreamDecoder,
    DecodeState,
    LMInput,
    Qwen2LM,
    SpeechTokenSampler,
    load_llm,
    load_llm_config,
)
from cosyserve.nn.checkpoint import read_checkpoint
from tests.helpers.parity import ParitySet, assert_close

pytestmark = [pytest.mark.parity, pytest.mark.timeout(300)]

ATOL = 1e-4  # README: LLM logp (hidden states and inputs get the same bound)


# -- shared helpers ----------------------------------------------------------------------------


class TeacherSampler:
    """The harness's teacher: forced FILL when the state forces it; otherwise the next recorded
    text-phase token while EOS is masked (text streaming in), else the next final-phase token,
    then EOS."""

    def __init__(self, text_phase: Iterable[int], final: Iterable[int], eos: int):
        self.text_phase = [int(t) for t in text_phase]
        self.final = [int(t) for t in final] + [eos]

    def choose(self, logp: torch.Tensor, state: DecodeState) -> int:
        if state.forced_token is not None:
            return state.forced_token
        queue = self.text_phase if state.ignore_eos else self.final
        assert queue, "the state asked for more outputs than the reference produced"
        return queue.pop(0)


@dataclass
class Recording:
    """What a run fed and produced, grouped per output (one group = one upstream forward step)."""

    step_inputs: list[list[LMInput]] = field(default_factory=list)
    logp: list[torch.Tensor] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)
    eos_masked: list[bool] = field(default_factory=list)
    emitted: list[int] = field(default_factory=list)

    @property
    def step_input_lens(self) -> list[int]:
        return [len(s) for s in self.step_inputs]

    @property
    def inputs(self) -> list[LMInput]:
        return [x for step in self.step_inputs for x in step]

    def chosen_logp(self) -> torch.Tensor:
        return torch.stack([row[t] for row, t in zip(self.logp, self.outputs)])


@torch.inference_mode()
def drive(
    lm: Qwen2LM,
    state: DecodeState,
    sampler: TeacherSampler | SpeechTokenSampler,
    pieces: Sequence[Sequence[int]] = (),
    one_per_step: bool = False,
) -> Recording:
    """Run ``state`` to the end as an engine would: feed what it has pending (everything at once,
    or one position per step), consume a log-prob row only when an output is due, pull the next
    text piece when a bistream state waits for text."""
    text = iter(pieces)
    cache = lm.new_cache(1, 4)  # small on purpose: the cache grows while decoding
    rec = Recording()
    fed: list[LMInput] = []
    while not state.done:
        if one_per_step:
            item = state.next_input()
            items = [] if item is None else [item]
        else:
            items = state.take_inputs()
        if not items:
            assert isinstance(state, BistreamDecoder) and state.waiting, "nothing to run, no output due"
            piece = next(text, None)
            if piece is None:
                state.end_text()
            else:
                state.push_text(piece)
            continue
        fed += items
        hidden = lm.forward_inputs(lm.embed_inputs(items).unsqueeze(0), cache)[:, -1]
        if not state.output_due:
            continue
        logp = lm.log_probs(hidden)[0]
        masked = state.ignore_eos
        token = sampler.choose(logp, state)
        rec.step_inputs.append(fed)
        rec.logp.append(logp)
        rec.outputs.append(token)
        rec.eos_masked.append(masked)
        fed = []
        emitted = state.accept(token)
        if emitted is not None:
            rec.emitted.append(emitted)
    return rec


def text_pieces(ids: np.ndarray, lens: np.ndarray) -> list[list[int]]:
    """The text generator's pieces: consecutive ids from the start of ``ids`` (as many as the
    piece lengths add up to)."""
    out, start = [], 0
    for n in lens.tolist():
        out.append(ids[start : start + n].tolist())
        start += n
    assert start <= len(ids), "piece lengths exceed the text"
    return out


def teacher_rows(
    lm: Qwen2LM, prefix: torch.Tensor, teacher: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced incremental decoding: (hidden, log-probs), one row per step."""
    with torch.inference_mode():
        cache = lm.new_cache(1, 8)
        hidden = [lm.prefill_hidden(prefix, cache)]
        for token in teacher:
            hidden.append(lm.step_hidden(torch.tensor([int(token)]), cache))
        rows = torch.cat(hidden)
        # One decoder call per row, as upstream (a batched matmul rounds differently).
        return rows, torch.cat([lm.log_probs(h.unsqueeze(0)) for h in rows])


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm(parity_set: ParitySet) -> Qwen2LM:
    return load_llm(parity_set.path)


# -- tests ---------------------------------------------------------------------------------------


def test_config_comes_from_the_set(parity_set: ParitySet, lm: Qwen2LM) -> None:
    cfg = load_llm_config(parity_set.path)
    hidden = parity_set.arrays["llm_lm_input"].shape[-1]
    assert cfg.llm_input_size == cfg.backbone.hidden_size == hidden
    assert lm.vocab.head_size == parity_set.arrays["llm_logp"].shape[-1] == cfg.speech_token_size + 3
    assert lm.backbone.embed_tokens.weight.shape == (cfg.backbone.vocab_size, hidden)
    assert int(parity_set.arrays["llm_text_ids"].max()) < cfg.backbone.vocab_size
    # The text table is adopted as stored (rows converted when read); the unused text head is dropped.
    stored = read_checkpoint(parity_set.path / "llm.pt")
    assert lm.backbone.embed_tokens.weight.dtype == stored["llm.model.model.embed_tokens.weight"].dtype
    assert "llm.model.lm_head.weight" in stored and "llm.model.lm_head.weight" not in lm.state_dict()


def test_unistream_sft(parity_set: ParitySet, lm: Qwen2LM) -> None:
    ps = parity_set
    prefix = lm.build_prefix(ps.t("llm_text_ids"))
    assert_close(ps, "llm_lm_input", prefix, ps.t("llm_lm_input"), atol=ATOL)
    hidden, logp = teacher_rows(lm, prefix, ps.arrays["llm_teacher_tokens"])
    assert_close(ps, "llm_hidden", hidden, ps.t("llm_hidden"), atol=ATOL)
    assert_close(ps, "llm_logp", logp, ps.t("llm_logp"), atol=ATOL)


def test_unistream_zero_shot(parity_set: ParitySet, lm: Qwen2LM) -> None:
    ps = parity_set
    prefix = lm.build_prefix(
        ps.t("llm_text_ids"), ps.t("llm_zs_prompt_text_ids"), ps.t("llm_zs_prompt_speech_tokens")
    )
    assert_close(ps, "llm_zs_lm_input", prefix, ps.t("llm_zs_lm_input"), atol=ATOL)
    _, logp = teacher_rows(lm, prefix, ps.arrays["llm_zs_teacher_tokens"])
    assert_close(ps, "llm_zs_logp", logp, ps.t("llm_zs_logp"), atol=ATOL)


def test_full_causal_forward_matches_incremental_rows(parity_set: ParitySet, lm: Qwen2LM) -> None:
    ps = parity_set
    teacher = ps.t("llm_teacher_tokens")
    with torch.inference_mode():
        seq = torch.cat([lm.build_prefix(ps.t("llm_text_ids")), lm.speech_embedding(teacher).unsqueeze(0)], 1)
        full = lm.backbone(seq)[0, -(len(teacher) + 1) :]
    assert_close(ps, "llm_hidden (full forward)", full, ps.t("llm_hidden"), atol=ATOL)


def test_unistream_state_masks_eos_for_twice_the_text_length(parity_set: ParitySet, lm: Qwen2LM) -> None:
    """Reference rule: logp[EOS] = -inf for the first 2 x len(text) steps (prompt text excluded)."""
    ps = parity_set
    text = ps.arrays["llm_text_ids"]
    state = lm.unistream(text, ps.arrays["llm_zs_prompt_text_ids"])
    assert (state.min_len, state.max_len) == (2 * len(text), 20 * len(text))
    sampler = SpeechTokenSampler(lm.cfg.sampling, generator=0)
    eos = lm.vocab.eos
    row = torch.full((lm.vocab.head_size,), -30.0)
    row[eos:] = -1e9  # no other stop id
    row[eos] = 0.0  # EOS all but certain...
    row[5] = -5.0
    state.take_inputs()
    for _ in range(state.min_len):
        assert state.ignore_eos
        token = sampler.choose(row, state)
        assert token != eos  # ...yet masked
        state.accept(token)
        state.take_inputs()
    assert not state.ignore_eos and sampler.choose(row, state) == eos
    assert state.accept(eos) is None and state.done


@pytest.mark.parametrize("case", ["bi", "bizs"])
@pytest.mark.parametrize("one_per_step", [False, True], ids=["chunks", "one-per-step"])
def test_bistream_teacher_forced(parity_set: ParitySet, lm: Qwen2LM, case: str, one_per_step: bool) -> None:
    """Text streamed in: what is fed per step, the log-prob rows and the yielded tokens; fed as the
    reference groups it or one position per engine step."""
    ps = parity_set
    a = ps.arrays
    prompt = case == "bizs"
    state = lm.bistream(
        a["llm_zs_prompt_text_ids"] if prompt else None, a["llm_zs_prompt_speech_tokens"] if prompt else None
    )
    teacher = TeacherSampler(
        a[f"llm_{case}_teacher_text_phase"], a[f"llm_{case}_teacher_final"], lm.vocab.eos
    )
    pieces = text_pieces(a["llm_text_ids"], a[f"llm_{case}_text_chunk_lens"])
    rec = drive(lm, state, teacher, pieces, one_per_step=one_per_step)

    assert rec.emitted == a[f"llm_{case}_out_tokens"].tolist()
    assert rec.step_input_lens == a[f"llm_{case}_step_input_lens"].tolist()
    assert rec.outputs[-1] == lm.vocab.eos and not teacher.text_phase and not teacher.final
    assert rec.outputs.count(lm.vocab.fill) == len(rec.outputs) - len(rec.emitted) - 1
    with torch.inference_mode():
        inputs = lm.embed_inputs(rec.inputs).unsqueeze(0)
    mode = "one per step" if one_per_step else "chunks"
    assert_close(ps, f"llm_{case}_inputs ({mode})", inputs, ps.t(f"llm_{case}_inputs"), atol=ATOL)
    assert_close(ps, f"llm_{case}_logp ({mode})", torch.stack(rec.logp), ps.t(f"llm_{case}_logp"), atol=ATOL)


def test_bistream_library_loop_matches_the_recording(parity_set: ParitySet, lm: Qwen2LM) -> None:
    """Qwen2LM.run (the batch-1 loop behind generate_bistream) yields the reference's tokens."""
    a = parity_set.arrays
    teacher = TeacherSampler(a["llm_bizs_teacher_text_phase"], a["llm_bizs_teacher_final"], lm.vocab.eos)
    state = lm.bistream(a["llm_zs_prompt_text_ids"], a["llm_zs_prompt_speech_tokens"])
    pieces = text_pieces(a["llm_text_ids"], a["llm_bizs_text_chunk_lens"])
    assert list(lm.run(state, teacher, pieces)) == a["llm_bizs_out_tokens"].tolist()
