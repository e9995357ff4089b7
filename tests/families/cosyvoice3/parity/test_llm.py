"""CosyVoice3 LLM parity (CosyVoice3LM): teacher-forced zero-shot / cross-lingual / instruct2 rows,
the sampled decode replayed from the recorded uniform tape (nucleus + RAS, the SOS-masking quirk),
bistream with and without prompt speech, the LLM part of the end-to-end runs, the
``<|endofprompt|>`` requirement and the silent-token filter, against every set."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cosyserve.errors import InvalidRequestError
from cosyserve.families.cosyvoice2.llm import SpeechTokenSampler, UniformTape
from cosyserve.families.cosyvoice3.llm import CosyVoice3LM, SilentTokenFilter, load_llm, load_llm_config
from cosyserve.nn.sampling import _top_k_stable
from tests.families.cosyvoice2.parity.test_llm import TeacherSampler, drive, teacher_rows, text_pieces
from tests.helpers.parity import ParitySet, assert_close

pytestmark = [pytest.mark.parity, pytest.mark.timeout(300)]

ATOL = 1e-4  # README: LLM logp; the teacher / tape outputs must then match exactly

# (prompt text ids, prompt speech tokens) per teacher-forced case; text ids are f"llm_{case}_text_ids"
# except zero-shot, which synthesises llm_text_ids.
UNISTREAM = {
    "zs": ("llm_text_ids", "llm_prompt_text_ids", "llm_prompt_speech_tokens"),
    "xl": ("llm_xl_text_ids", None, None),
    "in": ("llm_in_text_ids", "llm_instruct_ids", None),
}
E2E = {  # the LLM stage of the end-to-end runs (prompt speech = the stand-in prompt tokens)
    "zs": ("e2e_zs_text_ids", "e2e_zs_prompt_text_ids", "audio_prompt_speech_tokens"),
    "xl": ("e2e_xl_text_ids", None, None),
    "in": ("e2e_in_text_ids", "e2e_in_prompt_text_ids", None),
}
BISTREAM = {"bizs": ("llm_prompt_text_ids", "llm_prompt_speech_tokens"), "biin": ("llm_instruct_ids", None)}


@pytest.fixture(scope="module")
def lm(parity_set: ParitySet) -> CosyVoice3LM:
    return load_llm(parity_set.path)


def _get(ps: ParitySet, key: str | None) -> np.ndarray | None:
    return None if key is None else ps.arrays[key]


def _tape(u: np.ndarray) -> UniformTape:
    """Per step [u_nucleus, u_ras or -1] -> the draws in the order the sampler makes them."""
    return UniformTape(float(x) for row in u for x in row if x >= 0)


class CountingSampler(SpeechTokenSampler):
    """Records how many uniform draws each step took: 1 = nucleus only, 2 = RAS fallback too."""

    def __init__(self, sampling, tape: UniformTape):
        super().__init__(sampling, uniform=tape)
        self.tape = tape
        self.draws: list[int] = []

    def choose(self, logp: torch.Tensor, state) -> int:
        before = len(self.tape)
        token = super().choose(logp, state)
        self.draws.append(before - len(self.tape))
        return token


def _nucleus_size(logp: torch.Tensor, top_p: float, top_k: int) -> int:
    """How many candidates upstream's nucleus walk takes (sequential float32 cumulative sum)."""
    head, _ = _top_k_stable(logp.softmax(dim=0), top_k)
    cum = np.cumsum(head.numpy(), dtype=np.float32)
    return 1 + int(np.count_nonzero(cum[:-1] < np.float32(top_p)))


def test_layout_comes_from_the_set(parity_set: ParitySet, lm: CosyVoice3LM) -> None:
    cfg = load_llm_config(parity_set.path)
    head = parity_set.arrays["llm_zs_logp"].shape[-1]
    assert lm.vocab.head_size == head == cfg.speech_token_size + 200
    assert lm.llm_decoder.bias is None and not hasattr(lm, "llm_embedding")
    v = cfg.speech_token_size
    assert (lm.vocab.sos, lm.vocab.eos, lm.vocab.task_id, lm.vocab.fill) == (v, v + 1, v + 2, v + 3)
    assert lm.vocab.stop_ids == frozenset(range(v, head))
    assert cfg.llm_input_size == parity_set.arrays["llm_zs_lm_input"].shape[-1]


@pytest.mark.parametrize("case", list(UNISTREAM))
def test_unistream_teacher_forced(parity_set: ParitySet, lm: CosyVoice3LM, case: str) -> None:
    ps = parity_set
    text, prompt_text, prompt_speech = (_get(ps, k) for k in UNISTREAM[case])
    prefix = lm.build_prefix(text, prompt_text, prompt_speech)
    assert_close(ps, f"llm_{case}_lm_input", prefix, ps.t(f"llm_{case}_lm_input"), atol=ATOL)
    hidden, logp = teacher_rows(lm, prefix, ps.arrays[f"llm_{case}_teacher_tokens"])
    assert_close(ps, f"llm_{case}_hidden", hidden, ps.t(f"llm_{case}_hidden"), atol=ATOL)
    assert_close(ps, f"llm_{case}_logp", logp, ps.t(f"llm_{case}_logp"), atol=ATOL)


def test_sampled_decode_replays_the_tape(parity_set: ParitySet, lm: CosyVoice3LM) -> None:
    """Nucleus + RAS from the recorded uniforms: every step's token, candidate count and fallback,
    and the quirk that ignore_eos masks 6561 (SOS) during the first 2 x len(text) steps."""
    ps = parity_set
    a = ps.arrays
    state = lm.unistream(a["llm_text_ids"], a["llm_prompt_text_ids"], a["llm_prompt_speech_tokens"])
    tape = _tape(a["llm_samp_u"])
    sampler = CountingSampler(lm.cfg.sampling, tape)
    rec = drive(lm, state, sampler)

    assert rec.outputs == a["llm_samp_step_tokens"].tolist()
    assert rec.emitted == a["llm_samp_tokens"].tolist()
    assert len(tape) == 0, "the tape was not consumed exactly"
    assert [int(m) for m in rec.eos_masked] == a["llm_samp_eos_masked"].tolist()
    assert lm.vocab.ignore_eos_id == lm.vocab.sos  # the quirk: EOS itself is never masked
    steps = a["llm_samp_logp_steps"].tolist()
    assert_close(
        ps, "llm_samp_logp", torch.stack([rec.logp[i] for i in steps]), ps.t("llm_samp_logp"), atol=ATOL
    )
    assert_close(ps, "llm_samp_logp_chosen", rec.chosen_logp(), ps.t("llm_samp_logp_chosen"), atol=ATOL)
    cfg = lm.cfg.sampling
    sizes = []
    for row, masked in zip(rec.logp, rec.eos_masked):
        row = row.clone()
        if masked:
            row[lm.vocab.ignore_eos_id] = float("-inf")
        sizes.append(_nucleus_size(row, cfg.top_p, cfg.top_k))
    assert sizes == a["llm_samp_ncand"].tolist()
    assert [int(n == 2) for n in sampler.draws] == a["llm_samp_ras"].tolist()


def test_generate_uses_the_pluggable_uniform_source(parity_set: ParitySet, lm: CosyVoice3LM) -> None:
    a = parity_set.arrays
    tokens = lm.generate(
        a["llm_text_ids"],
        prompt_text_ids=a["llm_prompt_text_ids"],
        prompt_speech_tokens=a["llm_prompt_speech_tokens"],
        uniform=_tape(a["llm_samp_u"]),
    )
    assert list(tokens) == a["llm_samp_tokens"].tolist()


@pytest.mark.parametrize("case", list(BISTREAM))
@pytest.mark.parametrize("one_per_step", [False, True], ids=["chunks", "one-per-step"])
def test_bistream_teacher_forced(
    parity_set: ParitySet, lm: CosyVoice3LM, case: str, one_per_step: bool
) -> None:
    ps = parity_set
    a = ps.arrays
    prompt_text, prompt_speech = (_get(ps, k) for k in BISTREAM[case])
    state = lm.bistream(prompt_text, prompt_speech)
    teacher = TeacherSampler(
        a[f"llm_{case}_teacher_text_phase"], a[f"llm_{case}_teacher_final"], lm.vocab.eos
    )
    pieces = text_pieces(a[f"llm_{case}_text_chunk_ids"], a[f"llm_{case}_text_chunk_lens"])
    rec = drive(lm, state, teacher, pieces, one_per_step=one_per_step)

    assert rec.outputs == a[f"llm_{case}_step_tokens"].tolist()
    assert rec.emitted == a[f"llm_{case}_out_tokens"].tolist()
    assert rec.step_input_lens == a[f"llm_{case}_step_input_lens"].tolist()
    mode = "one per step" if one_per_step else "chunks"
    with torch.inference_mode():
        inputs = lm.embed_inputs(rec.inputs).unsqueeze(0)
    assert_close(ps, f"llm_{case}_inputs ({mode})", inputs, ps.t(f"llm_{case}_inputs"), atol=ATOL)
    steps = a[f"llm_{case}_logp_steps"].tolist()
    rows = torch.stack([rec.logp[i] for i in steps])
    assert_close(ps, f"llm_{case}_logp ({mode})", rows, ps.t(f"llm_{case}_logp"), atol=ATOL)
    assert_close(
        ps, f"llm_{case}_logp_chosen ({mode})", rec.chosen_logp(), ps.t(f"llm_{case}_logp_chosen"), atol=ATOL
    )


@pytest.mark.parametrize("case", list(E2E))
def test_end_to_end_llm_stage(parity_set: ParitySet, lm: CosyVoice3LM, case: str) -> None:
    """The LLM steps of the CosyVoice3 API runs (frontend ids, the stand-in prompt tokens, tape)."""
    ps = parity_set
    a = ps.arrays
    text, prompt_text, prompt_speech = (_get(ps, k) for k in E2E[case])
    state = lm.unistream(text, prompt_text, prompt_speech)
    tape = _tape(a[f"e2e_{case}_llm_u"])
    rec = drive(lm, state, SpeechTokenSampler(lm.cfg.sampling, uniform=tape))
    assert rec.outputs == a[f"e2e_{case}_llm_step_tokens"].tolist() and len(tape) == 0
    assert_close(ps, f"e2e_{case}_llm_logp_row0", rec.logp[0], ps.t(f"e2e_{case}_llm_logp_row0"), atol=ATOL)
    assert_close(
        ps, f"e2e_{case}_llm_logp_chosen", rec.chosen_logp(), ps.t(f"e2e_{case}_llm_logp_chosen"), atol=ATOL
    )


def test_endofprompt_is_required(parity_set: ParitySet, lm: CosyVoice3LM) -> None:
    a = parity_set.arrays
    without = [t for t in a["llm_prompt_text_ids"].tolist() if t != lm.endofprompt_id]
    with pytest.raises(InvalidRequestError, match="endofprompt"):
        lm.unistream(a["llm_text_ids"], without)
    with pytest.raises(InvalidRequestError, match="endofprompt"):
        lm.bistream(without)
    # In the tts text instead (cross-lingual) it is enough.
    lm.unistream(a["llm_xl_text_ids"])


def test_silent_token_filter(parity_set: ParitySet) -> None:
    a = parity_set.arrays
    assert (
        SilentTokenFilter().filter(a["tts_silent_teacher"].tolist())
        == a["tts_silent_kept"].reshape(-1).tolist()
    )
