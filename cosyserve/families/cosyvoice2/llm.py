"""CosyVoice2's ``Qwen2LM`` (``llm.pt``): text (+ prompt) -> 25 Hz speech tokens on a Qwen2 backbone.

Inputs are embedding rows: ``sos`` / ``task_id`` (rows 0 / 1 of ``llm_embedding``), text (the
backbone's ``embed_tokens``) and speech tokens (``speech_embedding``). The head ``llm_decoder``
scores ``speech_token_size + 3`` ids: speech tokens ``[0, 6561)``, EOS 6561, an unused 6562 and the
bistream FILL token 6563. The speaker embedding is ignored by this LLM.

Decoding is split so that an engine can step many requests together, one input position per
request and step:

* a per-request state machine says what to feed next and when an output is due:
  :class:`UnistreamDecoder` (the whole text at once) or :class:`BistreamDecoder` (text streamed in,
  the reference's ``inference_bistream``: text and speech mixed 5:15, forced FILL tokens). Both
  are pure (no tensors): inputs are :class:`LMInput` records, outputs are token ids;
* the model turns inputs into embeddings (:meth:`Qwen2LM.embed_inputs`) and runs them through the
  backbone with a :class:`~cosyserve.nn.conformer.KVCache` (:meth:`Qwen2LM.forward_inputs`,
  :meth:`Qwen2LM.decode_inputs`; ragged rows: left padding, per-row positions);
* :class:`SpeechTokenSampler` picks the output from a log-prob row (forced FILL, or upstream's
  repetition-aware nucleus sampling with the EOS rule) from a per-request generator or a
  pluggable uniform source.

Per step, for every active row: ``x = state.next_input()``, run ``x`` (one row per request), then
``if state.output_due: state.accept(sampler.choose(logp_row, state))``. A joining request can be
prefilled with everything it has pending (``state.take_inputs()``). Feeding several pending positions
one per step or all at once is the same computation up to float rounding.

:meth:`Qwen2LM.generate` / :meth:`Qwen2LM.generate_bistream` are the batch-1 loops.

Reference behaviour kept on purpose (see the parity README): EOS is masked for the first
``2 x len(text)`` steps; unistream stops on any of EOS / 6562 / FILL; bistream's FILL is never fed
back and, when the text phase ended with a FILL, the final phase re-feeds the last speech token.
The transformers-5.x bugs the README records (a length-1 attention mask, a cache length read from a
legacy tuple) are not reproduced: every step attends to the whole history.
"""

from __future__ import annotations

import enum
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from cosyserve.errors import InvalidRequestError, SynthesisFailedError
from cosyserve.nn.checkpoint import load_into, read_checkpoint, skip_random_init
from cosyserve.nn.config import SamplingConfig
from cosyserve.nn.conformer import KVCache
from cosyserve.nn.qwen2 import LM_HEAD_KEY, Qwen2Config, Qwen2ForCausalLM, Qwen2Model, drop_lm_head
from cosyserve.nn.qwen2 import load_qwen2_config as _load_qwen2_config
from cosyserve.nn.sampling import UniformSource, make_generator, ras_sampling
from cosyserve.nn.yaml_reader import MISSING, ConfigContext, load_yaml_tree

logger = logging.getLogger(__name__)

QWEN2_LM = "cosyvoice.llm.llm.Qwen2LM"
QWEN2_ENCODER = "cosyvoice.llm.llm.Qwen2Encoder"
RAS_SAMPLING = "cosyvoice.utils.common.ras_sampling"
BACKBONE_DIR = "CosyVoice-BlankEN"
LLM_CHECKPOINT = "llm.pt"
ENDOFPROMPT_ID = 151646  # upstream hard-codes it; the tokenizer gives the id of a real directory

# Upstream CosyVoice2Model.tts passes no ratios: inference()'s defaults apply.
MIN_TOKEN_TEXT_RATIO = 2.0
MAX_TOKEN_TEXT_RATIO = 20.0


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class Qwen2LMConfig:
    """What the LLM is built from: the yaml's ``llm`` node plus the backbone's ``config.json``."""

    llm_input_size: int = 896
    llm_output_size: int = 896
    speech_token_size: int = 6561
    mix_ratio: tuple[int, int] = (5, 15)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    backbone: Qwen2Config = field(default_factory=Qwen2Config)
    min_token_text_ratio: float = MIN_TOKEN_TEXT_RATIO
    max_token_text_ratio: float = MAX_TOKEN_TEXT_RATIO


def qwen2_lm_config(
    tree: dict[str, Any],
    backbone: Qwen2Config,
    source: str = "<yaml>",
    lm_classes: tuple[str, ...] = (QWEN2_LM,),
) -> Qwen2LMConfig:
    """Map the parsed yaml (:func:`cosyserve.nn.yaml_reader.load_yaml_tree`) and the backbone
    config into :class:`Qwen2LMConfig`; ModelConfigError (naming the key) for anything else."""
    ctx = ConfigContext(source)
    node = ctx.node("llm", tree.get("llm", MISSING), lm_classes)
    node.child("llm", (QWEN2_ENCODER,))  # its pretrain_path is the model dir's CosyVoice-BlankEN
    sampling_node = ctx.node("llm.sampling", node.kwargs.get("sampling", MISSING), (RAS_SAMPLING,), ("name",))
    mix_ratio = node.ints("mix_ratio", (5, 15))
    if len(mix_ratio) != 2 or min(mix_ratio) <= 0:
        ctx.fail(f"'llm.mix_ratio' must be two positive integers [text, speech], got {list(mix_ratio)}")
    cfg = Qwen2LMConfig(
        llm_input_size=node.int("llm_input_size"),
        llm_output_size=node.int("llm_output_size"),
        speech_token_size=node.int("speech_token_size"),
        mix_ratio=(mix_ratio[0], mix_ratio[1]),
        sampling=SamplingConfig(
            top_p=sampling_node.float("top_p", 0.8),
            top_k=sampling_node.int("top_k", 25),
            win_size=sampling_node.int("win_size", 10),
            tau_r=sampling_node.float("tau_r", 0.1),
        ),
        backbone=backbone,
    )
    for name in ("llm_input_size", "llm_output_size"):
        if getattr(cfg, name) != backbone.hidden_size:
            ctx.fail(
                f"'llm.{name}' ({getattr(cfg, name)}) != hidden_size ({backbone.hidden_size}) of "
                f"{BACKBONE_DIR}/config.json"
            )
    return cfg


def load_llm_config(
    model_dir: str | os.PathLike[str],
    yaml_name: str = "cosyvoice2.yaml",
    lm_classes: tuple[str, ...] = (QWEN2_LM,),
) -> Qwen2LMConfig:
    """The LLM config of a model directory: ``<yaml_name>`` + ``CosyVoice-BlankEN/config.json``."""
    model_dir = Path(model_dir)
    path = model_dir / yaml_name
    return qwen2_lm_config(load_yaml_tree(path), load_backbone_config(model_dir), str(path), lm_classes)


def load_backbone_config(model_dir: str | os.PathLike[str]) -> Qwen2Config:
    """``<model_dir>/CosyVoice-BlankEN/config.json`` (never the weights beside it)."""
    return _load_qwen2_config(Path(model_dir) / BACKBONE_DIR)


# --------------------------------------------------------------------------------------------
# Ids and inputs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpeechVocab:
    """The ids of one family's speech head."""

    speech_token_size: int  # ids [0, speech_token_size) are speech tokens
    head_size: int
    sos: int  # row of the table the family takes special inputs from
    task_id: int
    eos: int
    fill: int
    stop_ids: frozenset[int]

    @classmethod
    def cosyvoice2(cls, speech_token_size: int) -> SpeechVocab:
        v = speech_token_size
        return cls(v, v + 3, sos=0, task_id=1, eos=v, fill=v + 2, stop_ids=frozenset(range(v, v + 3)))

    @property
    def ignore_eos_id(self) -> int:
        """The column ``sampling_ids(ignore_eos=True)`` masks: ``speech_token_size`` (EOS in
        CosyVoice2; SOS in CosyVoice3, where this is an upstream quirk)."""
        return self.speech_token_size

    def is_speech(self, token: int) -> bool:
        return 0 <= token < self.speech_token_size


class InputKind(enum.IntEnum):
    SOS = 0
    TASK = 1
    TEXT = 2
    SPEECH = 3


class LMInput(NamedTuple):
    """One input position: a special row, a text token id or a speech token id."""

    kind: InputKind
    id: int = -1


SOS_INPUT = LMInput(InputKind.SOS)
TASK_INPUT = LMInput(InputKind.TASK)


def text_inputs(ids: Iterable[int]) -> list[LMInput]:
    return [LMInput(InputKind.TEXT, int(i)) for i in ids]


def speech_inputs(ids: Iterable[int]) -> list[LMInput]:
    return [LMInput(InputKind.SPEECH, int(i)) for i in ids]


def as_id_list(ids: Tensor | np.ndarray | Sequence[int] | None) -> list[int]:
    """Token ids of any shape (tensor, array, sequence; `[1, T]` included) as a flat list."""
    if ids is None:
        return []
    if isinstance(ids, (Tensor, np.ndarray)):
        return [int(i) for i in ids.reshape(-1).tolist()]
    return [int(i) for i in ids]


def length_limits(n_text: int, cfg: Qwen2LMConfig) -> tuple[int, int]:
    """(min_len, max_len) in speech tokens for ``n_text`` TTS text tokens (prompt text excluded)."""
    return int(n_text * cfg.min_token_text_ratio), int(n_text * cfg.max_token_text_ratio)


# --------------------------------------------------------------------------------------------
# Per-request decoding state machines (pure: ids in, ids out)
# --------------------------------------------------------------------------------------------


class DecodeState:
    """What every decoding state machine exposes to a driver (engine row or batch-1 loop)."""

    vocab: SpeechVocab

    def __init__(self, vocab: SpeechVocab):
        self.vocab = vocab
        self.emitted: list[int] = []  # speech tokens handed downstream
        self.done = False
        self._inputs: list[LMInput] = []  # upstream's current `lm_input`
        self._fed = 0  # how many of them were run through the model

    # -- feeding -------------------------------------------------------------------------------

    def _feedable(self) -> int:
        return len(self._inputs) - self._fed

    def next_input(self) -> LMInput | None:
        """The next position to run (marked as fed), or None if there is nothing to run now."""
        if self.done or self._feedable() <= 0:
            return None
        item = self._inputs[self._fed]
        self._fed += 1
        return item

    def take_inputs(self) -> list[LMInput]:
        """Every position that can be run now, in order (marked as fed): a prefill."""
        count = 0 if self.done else self._feedable()
        if count <= 0:
            return []
        items = self._inputs[self._fed : self._fed + count]
        self._fed += count
        return items

    @property
    def pending(self) -> int:
        """Positions that can be run now."""
        return 0 if self.done else max(self._feedable(), 0)

    # -- outputs -------------------------------------------------------------------------------

    @property
    def output_due(self) -> bool:
        """True when the last position run must now be turned into an output (``accept``)."""
        raise NotImplementedError

    @property
    def forced_token(self) -> int | None:
        """The output the reference forces at this step (FILL), or None: sample one."""
        return None

    @property
    def ignore_eos(self) -> bool:
        """Whether the reference's ``sampling_ids(ignore_eos=True)`` applies at this step."""
        raise NotImplementedError

    @property
    def masked_ids(self) -> tuple[int, ...]:
        """Ids the sampler must not draw at this step (``vocab.ignore_eos_id`` under ignore_eos)."""
        return (self.vocab.ignore_eos_id,) if self.ignore_eos else ()

    @property
    def history(self) -> Sequence[int]:
        """The decoded tokens the repetition-aware sampler looks back on."""
        return self.emitted

    def accept(self, token: int) -> int | None:
        """Record this step's output; returns the speech token to emit, or None (FILL, stop)."""
        raise NotImplementedError


class UnistreamDecoder(DecodeState):
    """The whole text at once (upstream ``inference`` + ``inference_wrapper``).

    Prefix ``[sos, text(prompt_text ++ text), task_id, speech(prompt_speech)]``, then one speech
    token per step. EOS (``vocab.ignore_eos_id``) is masked while fewer than ``min_len`` tokens were
    emitted; any stop id ends decoding (not emitted); at most ``max_len`` tokens.

    ``force_length`` (benchmarks): every stop id is masked, so exactly ``max_len`` tokens come out.
    """

    def __init__(
        self,
        vocab: SpeechVocab,
        text_ids: Sequence[int],
        prompt_text_ids: Sequence[int] = (),
        prompt_speech_tokens: Sequence[int] = (),
        *,
        min_len: int,
        max_len: int,
        force_length: bool = False,
    ):
        super().__init__(vocab)
        self.min_len, self.max_len = int(min_len), int(max_len)
        self.force_length = force_length
        self._inputs = [
            SOS_INPUT,
            *text_inputs(prompt_text_ids),
            *text_inputs(text_ids),
            TASK_INPUT,
            *speech_inputs(prompt_speech_tokens),
        ]
        self.done = self.max_len <= 0

    @property
    def output_due(self) -> bool:
        return not self.done and self._fed == len(self._inputs)

    @property
    def ignore_eos(self) -> bool:
        return len(self.emitted) < self.min_len

    @property
    def masked_ids(self) -> tuple[int, ...]:
        if self.force_length:
            return tuple(sorted(self.vocab.stop_ids))
        return super().masked_ids

    def accept(self, token: int) -> int | None:
        if not self.output_due:
            raise RuntimeError("accept() called while no output is due")
        token = int(token)
        if token in self.vocab.stop_ids:
            self.done = True
            return None
        if not self.vocab.is_speech(token):
            raise SynthesisFailedError(
                f"the LLM produced id {token}, which is neither a speech token nor a stop id"
            )
        self.emitted.append(token)
        self._inputs, self._fed = [LMInput(InputKind.SPEECH, token)], 0
        if len(self.emitted) >= self.max_len:
            self.done = True
        return token


class _Phase(enum.Enum):
    IDLE = "idle"  # between text pieces: nothing decoded until more text arrives
    TEXT = "text"  # decoding until a FILL (text still streaming; EOS masked)
    FINAL = "final"  # text ended: decoding until EOS


class BistreamDecoder(DecodeState):
    """Text streamed in (upstream ``inference_bistream``), as an event-driven state machine.

    ``push_text(ids)`` is one piece of the reference's text generator (the reference frontend
    yields one token per piece); ``end_text()`` closes it. Pieces are processed in order, each once
    the previous decoding run ended: append it to the text cache; while prompt speech remains and
    ``mix[0]`` text are cached, append ``mix[0]`` text + ``mix[1]`` prompt-speech positions; once no
    prompt speech remains, after a FILL (or with only ``[sos]`` so far) take the next ``mix[0]``
    cached text positions (after a FILL they replace the pending input: FILL is never fed) or wait
    for more text; then decode until a FILL. FILL is forced when the output count reaches
    ``next_fill`` (``(P // mix[1] + 1) * mix[1] - P`` for P prompt speech tokens, then every
    ``mix[1] + 1`` outputs). At the end of the text: ``[pending, remaining text, task_id]`` (the
    pending input is re-fed if it was already run: the reference's quirk; prompt speech not yet
    mixed in is dropped, as there) and decode until EOS.

    ``split_at_endofprompt`` (CosyVoice3): the prompt text up to and including ``endofprompt_id``
    follows ``sos`` directly; only the rest goes through the text cache.

    ``max_token_text_ratio`` bounds the final phase (emitted tokens <= ratio x text tokens pushed);
    the reference decodes until EOS without a bound. None: unbounded.
    """

    def __init__(
        self,
        vocab: SpeechVocab,
        prompt_text_ids: Sequence[int] = (),
        prompt_speech_tokens: Sequence[int] = (),
        *,
        mix_ratio: tuple[int, int] = (5, 15),
        split_at_endofprompt: bool = False,
        endofprompt_id: int = ENDOFPROMPT_ID,
        max_token_text_ratio: float | None = MAX_TOKEN_TEXT_RATIO,
    ):
        super().__init__(vocab)
        self.mix_text, self.mix_speech = int(mix_ratio[0]), int(mix_ratio[1])
        self.max_token_text_ratio = max_token_text_ratio
        prompt_text = [int(i) for i in prompt_text_ids]
        self._inputs = [SOS_INPUT]
        if split_at_endofprompt:
            if endofprompt_id not in prompt_text:
                raise InvalidRequestError(
                    "text streamed in needs <|endofprompt|> in the prompt text (or instruct text) for this "
                    "model, e.g. 'You are a helpful assistant.<|endofprompt|>' before the prompt transcript"
                )
            end = prompt_text.index(endofprompt_id) + 1
            self._inputs += text_inputs(prompt_text[:end])
            prompt_text = prompt_text[end:]
        self._text_cache: deque[int] = deque(prompt_text)
        self._prompt_speech: deque[int] = deque(int(t) for t in prompt_speech_tokens)
        n_prompt = len(self._prompt_speech)
        self._next_fill = (n_prompt // self.mix_speech + 1) * self.mix_speech - n_prompt
        self._outputs: list[int] = []  # every output, FILL included (upstream's out_tokens)
        self._consumed = False  # the pending input was run by a step that produced an output
        self._pieces: deque[list[int]] = deque()
        self._text_ended = False
        self._n_text = 0
        self._phase = _Phase.IDLE
        self._masked: dict[_Phase, tuple[int, ...]] = {}  # masked_ids per phase

    # -- text events ---------------------------------------------------------------------------

    def push_text(self, ids: Sequence[int] | Tensor) -> None:
        """One piece of text (token ids) arrived."""
        if self._text_ended:
            raise RuntimeError("push_text() after end_text()")
        piece = as_id_list(ids)
        self._n_text += len(piece)
        self._pieces.append(piece)
        self._advance()

    def end_text(self) -> None:
        """No more text will come."""
        if not self._text_ended:
            self._text_ended = True
            self._advance()

    @property
    def waiting(self) -> bool:
        """True when nothing can be run until more text arrives (or the text ends)."""
        return not self.done and self._phase is _Phase.IDLE and self.pending == 0

    @property
    def text_ended(self) -> bool:
        return self._text_ended

    @property
    def phase(self) -> str:
        return self._phase.value

    # -- the reference's loop, one event at a time ------------------------------------------------

    def _feedable(self) -> int:
        if self._consumed:  # already run: re-fed only as the start of the final phase
            return 0
        unfed = len(self._inputs) - self._fed
        # While waiting for text, run ahead but keep the last position back: the step that runs
        # it is the one whose output is due, whenever decoding starts.
        return unfed - 1 if self._phase is _Phase.IDLE and unfed > 0 else unfed

    def _set_inputs(self, items: list[LMInput]) -> None:
        self._inputs, self._fed, self._consumed = items, 0, False

    def _advance(self) -> None:
        while self._phase is _Phase.IDLE and not self.done:
            if self._pieces:
                self._process_piece(self._pieces.popleft())
            elif self._text_ended:
                self._start_final()
            else:
                return

    def _take_text(self, n: int) -> list[LMInput]:
        return text_inputs(self._text_cache.popleft() for _ in range(n))

    def _process_piece(self, piece: list[int]) -> None:
        self._text_cache.extend(piece)
        while self._prompt_speech and len(self._text_cache) >= self.mix_text:
            take = min(self.mix_speech, len(self._prompt_speech))
            speech = speech_inputs(self._prompt_speech.popleft() for _ in range(take))
            self._inputs += self._take_text(self.mix_text) + speech
        if self._prompt_speech:
            return  # wait for more text to mix with the prompt speech
        after_fill = bool(self._outputs) and self._outputs[-1] == self.vocab.fill
        if after_fill or (not self._outputs and len(self._inputs) == 1):
            if len(self._text_cache) < self.mix_text:
                return  # not enough text to decode: wait for more
            block = self._take_text(self.mix_text)
            if after_fill:
                self._set_inputs(block)
            else:
                self._inputs += block
        self._phase = _Phase.TEXT

    def _start_final(self) -> None:
        tail = self._take_text(len(self._text_cache)) + [TASK_INPUT]
        if self._consumed:
            self._set_inputs(self._inputs + tail)  # the reference feeds the old input again
        else:
            self._inputs = self._inputs + tail
        self._phase = _Phase.FINAL

    # -- outputs -------------------------------------------------------------------------------

    @property
    def output_due(self) -> bool:
        return (
            not self.done
            and self._phase is not _Phase.IDLE
            and not self._consumed
            and self._fed == len(self._inputs)
        )

    @property
    def forced_token(self) -> int | None:
        if self._phase is _Phase.TEXT and len(self._outputs) == self._next_fill:
            return self.vocab.fill
        return None

    @property
    def ignore_eos(self) -> bool:
        return self._phase is _Phase.TEXT

    @property
    def masked_ids(self) -> tuple[int, ...]:
        """Beyond the reference's EOS rule, the ids it fails on (raises) in this phase are never
        drawn: a stop id other than FILL while text streams in, other than EOS after it. A trained
        model all but never draws them; a served request must not fail when one would."""
        masked = self._masked.get(self._phase)
        if masked is None:
            vocab = self.vocab
            valid = vocab.fill if self._phase is _Phase.TEXT else vocab.eos
            masked = self._masked[self._phase] = tuple(
                sorted({*super().masked_ids, *(vocab.stop_ids - {valid})})
            )
        return masked

    @property
    def history(self) -> Sequence[int]:
        return self._outputs

    @property
    def outputs(self) -> list[int]:
        """Every output so far, FILL tokens included (EOS too once decoded)."""
        return list(self._outputs)

    def accept(self, token: int) -> int | None:
        if not self.output_due:
            raise RuntimeError("accept() called while no output is due")
        token = int(token)
        vocab = self.vocab
        if self._phase is _Phase.TEXT:
            if token == vocab.fill:
                self._next_fill = len(self._outputs) + self.mix_speech + 1
            self._outputs.append(token)
            if token == vocab.fill:
                self._consumed = True
                self._phase = _Phase.IDLE
                self._advance()
                return None
            if not vocab.is_speech(token):
                raise SynthesisFailedError(
                    f"the LLM produced id {token} while text was streaming in (only speech tokens or FILL "
                    "are valid there)"
                )
        else:
            self._outputs.append(token)
            if token == vocab.eos:
                self.done = True
                return None
            if not vocab.is_speech(token):
                raise SynthesisFailedError(
                    f"the LLM produced id {token} after the text ended (only speech tokens or EOS are valid)"
                )
        self.emitted.append(token)
        self._set_inputs([LMInput(InputKind.SPEECH, token)])
        if (
            self._phase is _Phase.FINAL
            and self.max_token_text_ratio is not None
            and len(self.emitted) >= self.max_token_text_ratio * max(self._n_text, 1)
        ):
            logger.warning(
                "streamed-text decoding stopped at %d speech tokens without EOS", len(self.emitted)
            )
            self.done = True
        return token


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


class SpeechTokenSampler:
    """Per-request output choice: the forced token if the state has one, else upstream's
    ``sampling_ids`` (mask the state's ``masked_ids``, then ``ras_sampling`` over the state's
    history) with draws from ``generator`` or ``uniform``."""

    def __init__(
        self,
        sampling: SamplingConfig | None = None,
        generator: torch.Generator | int | None = None,
        uniform: UniformSource | None = None,
    ):
        self.sampling = sampling or SamplingConfig()
        self.generator = make_generator(generator)
        self.uniform = uniform

    def choose(self, logp: Tensor, state: DecodeState) -> int:
        forced = state.forced_token
        if forced is not None:
            return forced
        row = logp.detach().reshape(-1).to(device="cpu", dtype=torch.float32)
        masked = state.masked_ids
        if masked:
            row = row.clone()
            row[list(masked)] = float("-inf")
        return ras_sampling(row, state.history, self.generator, self.sampling, self.uniform)


class UniformTape:
    """A uniform source that replays recorded draws in order (parity tapes)."""

    def __init__(self, values: Iterable[float]):
        self._values = deque(float(v) for v in values)

    def __call__(self) -> float:
        if not self._values:
            raise RuntimeError("the uniform tape is exhausted")
        return self._values.popleft()

    def __len__(self) -> int:
        return len(self._values)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class Qwen2Encoder(nn.Module):
    """Upstream's wrapper name: ``llm.model`` = the Qwen2 causal LM (``llm.model.model`` = decoder)."""

    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.model = Qwen2ForCausalLM(cfg)


class Qwen2LM(nn.Module):
    """CosyVoice2's speech-token LLM. See the module docstring for the decoding API."""

    family = "cosyvoice2"

    def __init__(self, cfg: Qwen2LMConfig):
        super().__init__()
        self.cfg = cfg
        self.vocab = self._make_vocab(cfg)
        self._build_heads(cfg)

    # -- layout (CosyVoice3 overrides these two) ---------------------------------------------------

    @staticmethod
    def _make_vocab(cfg: Qwen2LMConfig) -> SpeechVocab:
        return SpeechVocab.cosyvoice2(cfg.speech_token_size)

    def _build_heads(self, cfg: Qwen2LMConfig) -> None:
        self.llm_embedding = nn.Embedding(2, cfg.llm_input_size)
        self.llm = Qwen2Encoder(cfg.backbone)
        self.llm_decoder = nn.Linear(cfg.llm_output_size, self.vocab.head_size)
        self.speech_embedding = nn.Embedding(self.vocab.head_size, cfg.llm_input_size)

    def special_embedding(self, kind: InputKind) -> Tensor:
        """The ``sos`` / ``task_id`` row `[D]`."""
        row = self.vocab.sos if kind is InputKind.SOS else self.vocab.task_id
        return self.llm_embedding.weight[row]

    # -- inputs --------------------------------------------------------------------------------

    @property
    def backbone(self) -> Qwen2Model:
        return self.llm.model.model

    @property
    def device(self) -> torch.device:
        return self.speech_embedding.weight.device

    def embed_text(self, ids: Tensor | Sequence[int]) -> Tensor:
        return self.backbone.embed(ids)

    def embed_inputs(self, items: Sequence[LMInput]) -> Tensor:
        """Input records -> embedding rows ``[n, D]`` (runs of one kind are looked up together)."""
        parts: list[Tensor] = []
        i, n = 0, len(items)
        while i < n:
            kind = items[i].kind
            j = i + 1
            if kind in (InputKind.TEXT, InputKind.SPEECH):
                while j < n and items[j].kind is kind:
                    j += 1
                ids = torch.tensor([it.id for it in items[i:j]], dtype=torch.long, device=self.device)
                parts.append(self.embed_text(ids) if kind is InputKind.TEXT else self.speech_embedding(ids))
            else:
                parts.append(self.special_embedding(kind).unsqueeze(0))
            i = j
        if not parts:
            return self.speech_embedding.weight.new_zeros(0, self.cfg.llm_input_size)
        return torch.cat(parts).to(self.backbone.dtype)

    def build_prefix(
        self,
        text_ids: Tensor | Sequence[int],
        prompt_text_ids: Tensor | Sequence[int] | None = None,
        prompt_speech_tokens: Tensor | Sequence[int] | None = None,
    ) -> Tensor:
        """``[sos, text(prompt_text ++ text), task_id, speech(prompt_speech)]`` as ``[1, L, D]``."""
        state = self.unistream(text_ids, prompt_text_ids, prompt_speech_tokens, max_len=1)
        return self.embed_inputs(state.take_inputs()).unsqueeze(0)

    # -- decoding (batchable) ------------------------------------------------------------------

    def new_cache(
        self, batch: int = 1, capacity: int = 256, pad: Tensor | Sequence[int] | None = None
    ) -> KVCache:
        return self.backbone.new_cache(batch, capacity, pad=pad)

    def forward_inputs(self, x: Tensor, cache: KVCache) -> Tensor:
        """Embeddings ``[B, n, D]`` appended to ``cache`` -> backbone outputs ``[B, n, D]``."""
        return self.backbone.forward_chunk(x, cache)

    def log_probs(self, hidden: Tensor) -> Tensor:
        """Backbone output rows ``[B, D]`` -> log-probs ``[B, head_size]``."""
        return self.llm_decoder(hidden).log_softmax(dim=-1)

    def prefill_hidden(self, lm_input: Tensor, cache: KVCache) -> Tensor:
        """Prefix ``[B, L, D]`` (left-padded to ``cache.pad``) into an empty cache -> last output ``[B, D]``."""
        return self.forward_inputs(lm_input, cache)[:, -1]

    def step_hidden(self, tokens: Tensor, cache: KVCache) -> Tensor:
        """One speech token per row (``[B]``) -> backbone output ``[B, D]`` at the new position."""
        x = self.speech_embedding(tokens.reshape(-1, 1).to(self.device))
        return self.forward_inputs(x, cache)[:, -1]

    def decode_step(self, tokens: Tensor, cache: KVCache) -> Tensor:
        """Speech tokens ``[B]`` -> next log-probs ``[B, V]`` (the v1 runner's decode step)."""
        return self.log_probs(self.step_hidden(tokens, cache))

    def decode_inputs(self, rows: Tensor, cache: KVCache) -> Tensor:
        """One embedding per row (``[B, D]``, e.g. ``embed_inputs([s.next_input() for s in states])``)
        -> log-probs ``[B, V]`` at the new position."""
        return self.decode_embeddings(rows.reshape(rows.shape[0], 1, -1), cache)

    # -- the batch runner's SpeechLM protocol (cosyserve.interfaces) ------------------------------

    def prefill_logp(self, prefixes: Tensor, cache: KVCache) -> Tensor:
        """Positions ``[B, L, D]`` appended to ``cache`` (an empty one: a left-padded prefill) ->
        log-probs ``[B, V]`` after the last one."""
        return self.log_probs(self.prefill_hidden(prefixes, cache))

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        """Speech tokens ``[B]`` -> their input embeddings ``[B, 1, D]``."""
        return self.speech_embedding(tokens.reshape(-1, 1).to(self.device))

    def decode_embeddings(self, inputs: Tensor, cache: KVCache) -> Tensor:
        """One input embedding per row ``[B, 1, D]`` -> log-probs ``[B, V]``."""
        return self.log_probs(self.forward_inputs(inputs, cache)[:, -1])

    # -- per-request states ----------------------------------------------------------------------

    def unistream(
        self,
        text_ids: Tensor | Sequence[int],
        prompt_text_ids: Tensor | Sequence[int] | None = None,
        prompt_speech_tokens: Tensor | Sequence[int] | None = None,
        *,
        min_len: int | None = None,
        max_len: int | None = None,
        num_tokens: int | None = None,
    ) -> UnistreamDecoder:
        """The state of one whole-text request (limits from the TTS text length by default;
        ``num_tokens=N``: exactly N tokens, every stop id masked, for benchmarks)."""
        text = as_id_list(text_ids)
        prompt_text = as_id_list(prompt_text_ids)
        self._check_text(text, prompt_text)
        lo, hi = length_limits(len(text), self.cfg)
        if num_tokens is not None:
            lo = hi = int(num_tokens)
        return UnistreamDecoder(
            self.vocab,
            text,
            prompt_text,
            as_id_list(prompt_speech_tokens),
            min_len=lo if min_len is None else min_len,
            max_len=hi if max_len is None else max_len,
            force_length=num_tokens is not None,
        )

    def bistream(
        self,
        prompt_text_ids: Tensor | Sequence[int] | None = None,
        prompt_speech_tokens: Tensor | Sequence[int] | None = None,
        *,
        max_token_text_ratio: float | None = MAX_TOKEN_TEXT_RATIO,
    ) -> BistreamDecoder:
        """The state of one text-streamed-in request; feed it with ``push_text`` / ``end_text``."""
        return BistreamDecoder(
            self.vocab,
            as_id_list(prompt_text_ids),
            as_id_list(prompt_speech_tokens),
            mix_ratio=self.cfg.mix_ratio,
            max_token_text_ratio=max_token_text_ratio,
            **self._bistream_options(),
        )

    def _bistream_options(self) -> dict[str, Any]:
        """Hook for family options of :class:`BistreamDecoder` (CosyVoice3 splits the prompt at
        <|endofprompt|>)."""
        return {}

    def _check_text(self, text: list[int], prompt_text: list[int]) -> None:
        """Hook for family rules on the ids (CosyVoice3 requires <|endofprompt|>)."""

    # -- batch-1 loops -----------------------------------------------------------------------------

    def run(
        self,
        state: DecodeState,
        sampler: SpeechTokenSampler,
        text_pieces: Iterable[Sequence[int]] | None = None,
        cache: KVCache | None = None,
        on_step: Callable[[list[LMInput], Tensor, int | None], None] | None = None,
    ) -> Iterator[int]:
        """Drive one state to the end: run what it has pending, choose the outputs it asks for,
        pull text pieces from ``text_pieces`` when a :class:`BistreamDecoder` waits for text.

        ``on_step(inputs, logp, output)`` is called after each model call (``logp`` `[V]`, None as
        output when no output was due): tests record what was fed and produced.
        """
        pieces = iter(text_pieces) if text_pieces is not None else None
        cache = cache if cache is not None else self.new_cache(1, 256)
        with torch.inference_mode():
            while not state.done:
                items = state.take_inputs()
                if not items:
                    if isinstance(state, BistreamDecoder) and state.waiting:
                        piece = next(pieces, None) if pieces is not None else None
                        if piece is None:
                            state.end_text()
                        else:
                            state.push_text(piece)
                        continue
                    raise RuntimeError(f"{type(state).__name__} has nothing to run and no output due")
                hidden = self.forward_inputs(self.embed_inputs(items).unsqueeze(0), cache)[:, -1]
                due = state.output_due
                if not due and on_step is None:
                    continue  # positions fed ahead of an output (bistream): no head needed
                logp = self.log_probs(hidden)[0]
                output = sampler.choose(logp, state) if due else None
                if on_step is not None:
                    on_step(items, logp, output)
                if output is not None:
                    token = state.accept(output)
                    if token is not None:
                        yield token

    def generate(
        self,
        text_ids: Tensor | Sequence[int],
        *,
        prompt_text_ids: Tensor | Sequence[int] | None = None,
        prompt_speech_tokens: Tensor | Sequence[int] | None = None,
        embedding: Tensor | None = None,
        generator: torch.Generator | int | None = None,
        sampling: SamplingConfig | None = None,
        uniform: UniformSource | None = None,
        num_tokens: int | None = None,
        min_len: int | None = None,
        max_len: int | None = None,
    ) -> Iterator[int]:
        """Yield speech tokens for the whole text (stop ids are never yielded).

        The v1 LLM's keywords: ``embedding`` is accepted and ignored (no speaker slot in this
        LLM); ``num_tokens=N`` gives exactly N tokens.
        """
        del embedding
        state = self.unistream(
            text_ids,
            prompt_text_ids,
            prompt_speech_tokens,
            min_len=min_len,
            max_len=max_len,
            num_tokens=num_tokens,
        )
        sampler = SpeechTokenSampler(sampling or self.cfg.sampling, generator, uniform)
        capacity = state.pending + min(state.max_len, 512) + 1
        yield from self.run(state, sampler, cache=self.new_cache(1, capacity))

    def generate_bistream(
        self,
        text_pieces: Iterable[Tensor | Sequence[int]],
        *,
        prompt_text_ids: Tensor | Sequence[int] | None = None,
        prompt_speech_tokens: Tensor | Sequence[int] | None = None,
        generator: torch.Generator | int | None = None,
        sampling: SamplingConfig | None = None,
        uniform: UniformSource | None = None,
    ) -> Iterator[int]:
        """Yield speech tokens while text pieces (token ids) are pulled from ``text_pieces``."""
        state = self.bistream(prompt_text_ids, prompt_speech_tokens)
        sampler = SpeechTokenSampler(sampling or self.cfg.sampling, generator, uniform)
        yield from self.run(state, sampler, (as_id_list(p) for p in text_pieces))


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

EMBED_TOKENS_KEY = "llm.model.model.embed_tokens.weight"
CHECKPOINT_LM_HEAD_KEY = f"llm.model.{LM_HEAD_KEY}"


def load_llm_weights(model: Qwen2LM, path: str | os.PathLike[str]) -> Qwen2LM:
    """Strictly load ``llm.pt`` into ``model`` without a second copy of the big tables.

    ``llm.model.lm_head.weight`` is checked and dropped unread; the text table ``embed_tokens`` is
    adopted as stored (memory-mapped, in the checkpoint's dtype: only the rows a request uses are
    ever read); every other tensor is adopted or converted to the network's dtype.
    """
    path = Path(path)
    state = drop_lm_head(read_checkpoint(path), CHECKPOINT_LM_HEAD_KEY, model.cfg.backbone, str(path))
    table = state.get(EMBED_TOKENS_KEY)
    if table is not None and table.dtype.is_floating_point:
        embedding = model.backbone.embed_tokens
        # The network's table takes the checkpoint's dtype, so the strict load adopts it as is.
        embedding.weight = nn.Parameter(
            torch.empty(embedding.weight.shape, dtype=table.dtype, device="meta"), requires_grad=False
        )
    load_into(model, state, path, config_name=f"cosyvoice yaml + {BACKBONE_DIR}/config.json")
    return model.eval()


def build_llm(cfg: Qwen2LMConfig, model_class: type[Qwen2LM] = Qwen2LM) -> Qwen2LM:
    """An LLM with uninitialised weights (for loading; random init skipped)."""
    with skip_random_init():
        return model_class(cfg)


def load_llm(
    model_dir: str | os.PathLike[str], cfg: Qwen2LMConfig | None = None, model_class: type[Qwen2LM] = Qwen2LM
) -> Qwen2LM:
    """Build and load ``<model_dir>/llm.pt`` (config from ``cosyvoice2.yaml`` unless given)."""
    model_dir = Path(model_dir)
    cfg = cfg or load_llm_config(model_dir)
    return load_llm_weights(build_llm(cfg, model_class), model_dir / LLM_CHECKPOINT)


__all__ = [
    "BistreamDecoder",
    "DecodeState",
    "InputKind",
    "LMInput",
    "Qwen2LM",
    "Qwen2LMConfig",
    "SpeechTokenSampler",
    "SpeechVocab",
    "UniformTape",
    "UnistreamDecoder",
    "build_llm",
    "length_limits",
    "load_llm",
    "load_llm_config",
    "load_llm_weights",
    "qwen2_lm_config",
]
