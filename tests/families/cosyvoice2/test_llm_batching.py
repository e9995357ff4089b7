"""The engine contract of the CosyVoice2/3 LLMs: many requests stepped together, one input position
per request and step (a joining request is prefilled with what it has pending), unistream and
text-streamed-in requests mixed, requests waiting for text parked out of the batch and stacked
back in. Every request must get exactly what its solo batch-1 run gives."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

from cosyserve.errors import InvalidRequestError, SynthesisFailedError
from cosyserve.families.cosyvoice2.llm import (
    BistreamDecoder,
    DecodeState,
    Qwen2LM,
    Qwen2LMConfig,
    SpeechTokenSampler,
    SpeechVocab,
    UnistreamDecoder,
)
from cosyserve.families.cosyvoice3.llm import CosyVoice3LM
from cosyserve.nn.conformer import KVCache
from cosyserve.nn.qwen2 import Qwen2Config

pytestmark = pytest.mark.timeout(300)

ATOL = 2e-5
ENDOFPROMPT = 99  # stands in for <|endofprompt|> in the tiny text vocabulary
BACKBONE = Qwen2Config(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    vocab_size=100,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny networks: a second thread only adds synchronisation (costly on a busy machine).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_lm(family: str) -> Qwen2LM:
    torch.manual_seed(11)
    cfg = Qwen2LMConfig(llm_input_size=32, llm_output_size=32, backbone=BACKBONE)
    lm = CosyVoice3LM(cfg, endofprompt_id=ENDOFPROMPT) if family == "cosyvoice3" else Qwen2LM(cfg)
    with torch.no_grad():  # peaky, distinct logits: argmax choices are far from ties
        lm.llm_decoder.weight.mul_(8.0)
    return lm.eval()


class ArgmaxUntil:
    """Deterministic outputs: forced FILL, else the best speech token, and EOS once ``length``
    tokens were emitted and EOS is allowed (never while text still streams in)."""

    def __init__(self, length: int):
        self.length = length

    def choose(self, logp: torch.Tensor, state: DecodeState) -> int:
        if state.forced_token is not None:
            return state.forced_token
        vocab = state.vocab
        text_streaming = isinstance(state, BistreamDecoder) and state.ignore_eos
        if len(state.emitted) >= self.length and not text_streaming:
            return vocab.eos
        return int(logp[: vocab.speech_token_size].argmax())


@dataclass
class Job:
    state: DecodeState
    chooser: ArgmaxUntil
    start: int = 0  # engine step at which the request arrives
    text: dict[int, list[int] | None] = field(default_factory=dict)  # step -> piece (None: end)
    outputs: list[int] = field(default_factory=list)
    rows: list[torch.Tensor] = field(default_factory=list)

    def pieces(self) -> list[list[int]]:
        return [p for _, p in sorted(self.text.items()) if p is not None]


def make_jobs(lm: Qwen2LM) -> list[Job]:
    eop = [ENDOFPROMPT] if isinstance(lm, CosyVoice3LM) else []
    jobs = [
        Job(lm.unistream([4, 5, 6, *eop], [7, 8], list(range(100, 105))), ArgmaxUntil(12)),
        Job(lm.unistream([9, 10, 11, 12, 13, 14, 15, 16, 17, *eop]), ArgmaxUntil(21), start=3),
        Job(
            lm.bistream([20, 21, *eop]),
            ArgmaxUntil(40),
            start=1,
            text={2: [30, 31, 32], 4: [33, 34, 35, 36], 25: [37, 38, 39, 40, 41, 42], 45: None},
        ),
        Job(
            lm.bistream([22, 23, *eop, 24, 25], list(range(200, 217))),
            ArgmaxUntil(30),
            text={**{s: [50 + s] for s in range(1, 13)}, 13: None},
        ),
    ]
    for job in jobs:
        if isinstance(job.state, BistreamDecoder) and 0 in job.text:
            raise AssertionError("text arrives after the request")
    return jobs


def solo(lm: Qwen2LM, job: Job) -> tuple[list[int], list[torch.Tensor]]:
    outputs, rows = [], []

    def record(items, logp, output):
        if output is not None:
            outputs.append(output)
            rows.append(logp.clone())

    list(lm.run(job.state, job.chooser, job.pieces(), on_step=record))
    return outputs, rows


@torch.inference_mode()
def run_batched(lm: Qwen2LM, jobs: list[Job], max_steps: int = 2000) -> tuple[int, int]:
    """A small engine: one decode step for every running row, a left-padded prefill for joiners,
    waiting rows parked (their cache selected out) and stacked back when they have input."""
    rows: list[int] = []
    cache: KVCache | None = None
    parked: dict[int, KVCache] = {}
    started: set[int] = set()
    most_rows = parks = 0
    for step in range(max_steps):
        for job in jobs:
            if step in job.text:
                piece = job.text[step]
                job.state.end_text() if piece is None else job.state.push_text(piece)  # type: ignore[union-attr]
        if all(job.state.done for job in jobs):
            return most_rows, parks
        # Rows that cannot take an input this step leave the batch: done ones for good, waiting
        # ones into the parking (their own one-row cache).
        keep = []
        for pos, i in enumerate(rows):
            state = jobs[i].state
            if not state.done and state.pending == 0:
                assert cache is not None
                parked[i] = cache.select([pos])
                parks += 1
            elif not state.done:
                keep.append(pos)
        if len(keep) != len(rows):
            cache = cache.select(keep) if keep and cache is not None else None
            rows = [rows[p] for p in keep]
        for i in [i for i in parked if jobs[i].state.pending > 0]:
            back = parked.pop(i)
            cache = back if cache is None else KVCache.stack([cache, back], extra_capacity=4)
            rows.append(i)
        produced: list[tuple[int, torch.Tensor]] = []
        if rows:
            assert cache is not None
            inputs = [jobs[i].state.next_input() for i in rows]
            assert all(x is not None for x in inputs)
            logp = lm.decode_inputs(lm.embed_inputs(inputs), cache)
            produced += list(zip(rows, logp))
        joiners = [
            i
            for i, job in enumerate(jobs)
            if i not in started and step >= job.start and job.state.pending > 0
        ]
        if joiners:
            prefixes = [lm.embed_inputs(jobs[i].state.take_inputs()) for i in joiners]
            longest = max(p.shape[0] for p in prefixes)
            pad = [longest - p.shape[0] for p in prefixes]
            batch = torch.stack([F.pad(p, (0, 0, n, 0)) for p, n in zip(prefixes, pad)])
            new = lm.new_cache(len(joiners), longest + 4, pad=pad)
            logp = lm.log_probs(lm.prefill_hidden(batch, new))
            cache = new if cache is None else KVCache.stack([cache, new], extra_capacity=4)
            rows += joiners
            started.update(joiners)
            produced += list(zip(joiners, logp))
        most_rows = max(most_rows, len(rows))
        for i, row in produced:
            job = jobs[i]
            if job.state.output_due:
                token = job.chooser.choose(row, job.state)
                job.outputs.append(token)
                job.rows.append(row)
                job.state.accept(token)
    raise AssertionError("the batched run did not finish")


@pytest.mark.parametrize("family", ["cosyvoice2", "cosyvoice3"])
def test_batched_rows_equal_solo_runs(family: str) -> None:
    lm = tiny_lm(family)
    expected = [solo(lm, job) for job in make_jobs(lm)]
    jobs = make_jobs(lm)
    most_rows, parks = run_batched(lm, jobs)
    assert most_rows >= 3, "the schedule should batch several requests"
    assert parks >= 1, "a request waiting for text should have been parked"
    for index, (job, (outputs, rows)) in enumerate(zip(jobs, expected)):
        assert job.outputs == outputs, f"request {index}: outputs differ from its solo run"
        torch.testing.assert_close(torch.stack(job.rows), torch.stack(rows), atol=ATOL, rtol=0)
        assert outputs[-1] == lm.vocab.eos
    fills = [o for job in jobs for o in job.outputs if o == lm.vocab.fill]
    assert fills, "the streamed-text requests should have produced FILL tokens"


def test_bistream_waits_for_text_and_keeps_the_last_position_back() -> None:
    vocab = SpeechVocab.cosyvoice2(6561)
    state = BistreamDecoder(vocab, [1, 2, 3, 4, 5, 6, 7], [])  # prompt text only
    assert state.pending == 0 and state.waiting  # [sos]: the one position kept back
    state.push_text([8])  # 8 text cached; no decoding before a first block is appended
    assert not state.waiting and state.pending == 6 and not state.output_due  # [sos, 5 text]
    items = state.take_inputs()
    assert [x.kind.name for x in items] == ["SOS"] + ["TEXT"] * 5 and state.output_due
    assert state.forced_token is None and state.ignore_eos


def test_bistream_fill_cadence_and_final_phase() -> None:
    vocab = SpeechVocab.cosyvoice2(6561)
    state = BistreamDecoder(vocab, [], list(range(20)))  # 20 prompt speech tokens: FILL after 10
    state.push_text(list(range(5)))
    # [sos, 5 text, 15 prompt speech] can run ahead (but the last position), 5 prompt speech wait for text
    assert not state.waiting and state.pending == 20 and not state.output_due
    state.push_text(list(range(5, 10)))
    state.take_inputs()
    outputs = []
    while state.forced_token is None:
        outputs.append(state.accept(100 + len(outputs)))
        state.take_inputs()
    assert len(outputs) == 10 and state.accept(state.forced_token) is None  # (20 // 15 + 1) * 15 - 20
    assert state.waiting
    state.end_text()  # final: [last speech again, task_id]
    items = state.take_inputs()
    assert [x.kind.name for x in items] == ["SPEECH", "TASK"] and items[0].id == 109
    assert not state.ignore_eos and state.forced_token is None
    with pytest.raises(SynthesisFailedError):
        state.accept(vocab.fill)  # only speech tokens or EOS after the text ended


def test_bistream_never_draws_the_ids_the_reference_fails_on() -> None:
    vocab = SpeechVocab.cosyvoice2(6561)
    state = BistreamDecoder(vocab, [], [])
    state.push_text(list(range(5)))
    state.take_inputs()
    assert set(state.masked_ids) == {vocab.eos, 6562}  # text streaming: speech or FILL only
    while state.forced_token is None:
        state.accept(3)
        state.take_inputs()
    state.accept(state.forced_token)  # FILL: the text phase's run ends
    state.end_text()
    state.take_inputs()
    assert set(state.masked_ids) == {6562, vocab.fill}  # text ended: speech or EOS only
    row = torch.full((vocab.head_size,), -30.0)
    row[6562] = 0.0  # all but certain, and invalid here
    row[7] = -3.0
    assert SpeechTokenSampler(generator=0).choose(row, state) == 7


def test_unistream_limits_and_stops() -> None:
    vocab = SpeechVocab.cosyvoice2(6561)
    state = UnistreamDecoder(vocab, [1, 2], min_len=4, max_len=3)
    assert state.take_inputs()[0].kind.name == "SOS"
    for token in (5, 6, 7):
        assert state.accept(token) == token
        state.take_inputs()
    assert state.done and state.emitted == [5, 6, 7]  # max_len reached
    state = UnistreamDecoder(vocab, [1], min_len=0, max_len=10)
    state.take_inputs()
    assert state.accept(vocab.fill) is None and state.done  # any stop id ends unistream decoding


def test_cosyvoice3_bistream_needs_endofprompt_in_the_prompt() -> None:
    lm = tiny_lm("cosyvoice3")
    with pytest.raises(InvalidRequestError):
        lm.bistream([1, 2, 3])


@pytest.mark.parametrize("family", ["cosyvoice2", "cosyvoice3"])
def test_num_tokens_gives_exactly_that_many_tokens(family: str) -> None:
    """The benchmark knob of the v1 LLM's generate(): every stop id masked, capped at N."""
    lm = tiny_lm(family)
    eop = [ENDOFPROMPT] if family == "cosyvoice3" else []
    state = lm.unistream([4, 5, *eop], num_tokens=7)
    assert set(state.masked_ids) == set(lm.vocab.stop_ids)
    row = torch.full((lm.vocab.head_size,), -20.0)
    row[sorted(lm.vocab.stop_ids)] = 0.0  # stopping would be all but certain
    row[3] = -2.0
    sampler = SpeechTokenSampler(lm.cfg.sampling, generator=1)
    state.take_inputs()
    assert lm.vocab.is_speech(sampler.choose(row, state))
    tokens = list(lm.generate([4, 5, *eop], embedding=torch.zeros(1, 192), generator=3, num_tokens=7))
    assert len(tokens) == 7 and all(lm.vocab.is_speech(t) for t in tokens)
