"""The fixed noise of CosyVoice3, reproduced exactly as the reference draws it.

Upstream draws three buffers once, at construction, from the GLOBAL torch RNG:

* ``CausalConditionalCFM.rand_noise`` = ``randn(1, 80, 15000)`` right after
  ``set_all_random_seed(0)``: the flow's initial ODE state is its first T frames.
* ``SineGen2.rand_ini`` ``(1, 9)`` (column 0 zeroed) and ``SineGen2.sine_waves``
  ``(1, 7200000, 9)``: uniform ``torch.rand`` values, the vocoder's noise, drawn after the
  flow's ``input_embedding`` / ``spk_embed_affine_layer`` and the f0 predictor have been
  initialised (their default inits consume the RNG in between).

So a real model directory gives the reference's audio only with these exact values. Here they
come from a private ``torch.Generator`` (the global RNG is never touched) replaying the same draws
in the same order. The vocoder's buffer (259 MB in full) is never materialised: CPU ``rand`` fills
a tensor serially in memory order, one 32-bit draw per value, so the buffer's samples
``[a, b)`` are a contiguous stretch of the stream. :class:`ReferenceHiFTNoise` keeps the
generator state at every block boundary it has passed (5 KB each) and regenerates the blocks a
call needs; equality with the one-shot draw is tested.
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from cosyserve.errors import InvalidRequestError

logger = logging.getLogger(__name__)

FLOW_NOISE_CHANNELS = 80
FLOW_NOISE_FRAMES = 50 * 300  # upstream: torch.randn([1, 80, 50 * 300])
FLOW_NOISE_SEED = 0  # CausalConditionalCFM.__init__: set_all_random_seed(0)
HIFT_NOISE_SAMPLES = 300 * 24000  # upstream: torch.rand(1, 300 * 24000, 9)
HIFT_NOISE_COLUMNS = 9
BLOCK_SAMPLES = 24000  # regeneration unit of ReferenceHiFTNoise


@functools.lru_cache(maxsize=1)
def reference_flow_noise() -> Tensor:
    """``torch.manual_seed(0); torch.randn(1, 80, 15000)`` without touching the global RNG
    (4.8 MB, built once per process, read-only by convention)."""
    generator = torch.Generator().manual_seed(FLOW_NOISE_SEED)
    return torch.randn(1, FLOW_NOISE_CHANNELS, FLOW_NOISE_FRAMES, generator=generator)


def check_flow_frames(frames: int) -> None:
    """Refuse mel lengths beyond the flow's fixed noise (upstream would fail on a shape mismatch)."""
    if frames > FLOW_NOISE_FRAMES:
        raise InvalidRequestError(
            f"too long: {frames} mel frames exceed the {FLOW_NOISE_FRAMES} frames (300 s) CosyVoice3's "
            "flow has fixed noise for; split the text into shorter segments"
        )


class HiFTNoise(Protocol):
    """The vocoder's noise: ``rand_ini`` ``[1, 9]`` and the uniform buffer by absolute sample."""

    @property
    def rand_ini(self) -> Tensor: ...

    def sine_waves(self, start: int, stop: int) -> Tensor:
        """Samples ``[start, stop)`` of the buffer, ``[stop - start, 9]`` float32."""
        ...


def _check_range(start: int, stop: int, available: int) -> None:
    if start < 0 or stop < start:
        raise ValueError(f"bad noise range [{start}, {stop})")
    if stop > available:
        raise InvalidRequestError(
            f"too long: {stop} samples exceed the {available} samples of fixed vocoder noise "
            f"({available / 24000:.0f} s at 24 kHz); split the text into shorter segments"
        )


@dataclass
class FixedHiFTNoise:
    """Noise from given tensors (the parity fixtures' tapes): ``sine_waves`` ``[1, N, 9]`` or
    ``[N, 9]``."""

    rand_ini_values: Tensor
    buffer: Tensor

    def __post_init__(self) -> None:
        if self.buffer.dim() == 3:
            self.buffer = self.buffer[0]
        self.buffer = self.buffer.float()
        self.rand_ini_values = self.rand_ini_values.float().reshape(1, -1)

    @property
    def rand_ini(self) -> Tensor:
        return self.rand_ini_values

    def sine_waves(self, start: int, stop: int) -> Tensor:
        _check_range(start, stop, self.buffer.shape[0])
        return self.buffer[start:stop]


@dataclass(frozen=True)
class NoiseRecipe:
    """The shapes of the modules upstream initialises between the flow's noise and the vocoder's
    (their default inits consume the RNG): from the model's config."""

    vocab_size: int = 6561  # flow.input_embedding: Embedding(vocab, input_size), normal_
    input_size: int = 80
    spk_embed_dim: int = 192  # flow.spk_embed_affine_layer: Linear(spk_embed_dim, output_size)
    output_size: int = 80
    f0_in_channels: int = 80  # hift.f0_predictor: CausalConvRNNF0Predictor
    f0_cond_channels: int = 512
    f0_num_class: int = 1

    @classmethod
    def from_config(cls, config: object) -> NoiseRecipe:
        """From a :class:`cosyserve.families.cosyvoice3.config.ModelConfig`."""
        flow, f0 = config.flow, config.hift.f0_predictor  # type: ignore[attr-defined]
        return cls(
            vocab_size=flow.vocab_size,
            input_size=flow.input_size,
            spk_embed_dim=flow.spk_embed_dim,
            output_size=flow.output_size,
            f0_in_channels=f0.in_channels,
            f0_cond_channels=f0.cond_channels,
            f0_num_class=f0.num_class,
        )

    def replay(self, generator: torch.Generator) -> Tensor:
        """Consume ``generator`` (seeded 0) exactly as upstream's construction does up to
        ``rand_ini``; returns ``rand_ini`` (column 0 zeroed). Values other than the RNG stream's
        position do not matter, so every draw goes into one scratch tensor per shape."""

        def uniform(*shape: int) -> None:
            torch.empty(shape).uniform_(generator=generator)

        torch.randn(1, FLOW_NOISE_CHANNELS, FLOW_NOISE_FRAMES, generator=generator)
        torch.empty(self.vocab_size, self.input_size).normal_(generator=generator)
        uniform(self.output_size, self.spk_embed_dim)  # Linear: weight, then bias
        uniform(self.output_size)
        c = self.f0_cond_channels
        for cin, k in ((self.f0_in_channels, 4), (c, 3), (c, 3), (c, 3), (c, 3)):
            uniform(c, cin, k)  # Conv1d: weight, then bias (weight norm draws nothing)
            uniform(c)
        uniform(self.f0_num_class, c)
        uniform(self.f0_num_class)
        rand_ini = torch.rand(1, HIFT_NOISE_COLUMNS, generator=generator)
        rand_ini[:, 0] = 0
        return rand_ini


class ReferenceHiFTNoise:
    """The reference's vocoder noise for a real model directory, generated lazily by blocks.

    Memory: the generator states of the blocks passed so far (5 KB per second of audio) plus the
    last block used; never the whole 259 MB buffer.
    """

    def __init__(self, recipe: NoiseRecipe | None = None, block_samples: int = BLOCK_SAMPLES):
        self.recipe = recipe or NoiseRecipe()
        self.block_samples = block_samples
        self._lock = threading.Lock()
        self._rand_ini: Tensor | None = None
        self._states: list[Tensor] = []  # generator state at the start of block i
        self._cached: tuple[int, Tensor] | None = None  # (block index, [block_samples, 9])

    def _start(self) -> None:
        generator = torch.Generator().manual_seed(FLOW_NOISE_SEED)
        self._rand_ini = self.recipe.replay(generator)
        self._states = [generator.get_state()]

    @property
    def rand_ini(self) -> Tensor:
        with self._lock:
            if self._rand_ini is None:
                self._start()
            assert self._rand_ini is not None
            return self._rand_ini

    def _block(self, index: int) -> Tensor:
        if self._cached is not None and self._cached[0] == index:
            return self._cached[1]
        generator = torch.Generator()
        # Walk forward from the last known state, recording the states on the way.
        known = min(index, len(self._states) - 1)
        generator.set_state(self._states[known])
        for i in range(known, index + 1):
            block = torch.rand(self._block_len(i), HIFT_NOISE_COLUMNS, generator=generator)
            if i + 1 == len(self._states):
                self._states.append(generator.get_state())
        self._cached = (index, block)
        return block

    def _block_len(self, index: int) -> int:
        return min(self.block_samples, HIFT_NOISE_SAMPLES - index * self.block_samples)

    def sine_waves(self, start: int, stop: int) -> Tensor:
        _check_range(start, stop, HIFT_NOISE_SAMPLES)
        with self._lock:
            if self._rand_ini is None:
                self._start()
            first, last = (
                start // self.block_samples,
                (stop - 1) // self.block_samples if stop > start else -1,
            )
            parts = []
            for index in range(first, last + 1):
                block = self._block(index)
                lo = max(start - index * self.block_samples, 0)
                hi = min(stop - index * self.block_samples, block.shape[0])
                parts.append(block[lo:hi])
            if not parts:
                return torch.zeros(0, HIFT_NOISE_COLUMNS)
            return parts[0].clone() if len(parts) == 1 else torch.cat(parts)
