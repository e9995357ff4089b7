"""Speech-token sampling: upstream's repetition-aware nucleus sampling, always from a per-request
:class:`torch.Generator` (never the global RNG), and the per-request sampling state."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from cosyserve.nn.config import SamplingConfig

# -- sampling ------------------------------------------------------------------------------------

UniformSource = Callable[[], float]
"""A source of uniform [0, 1) draws replacing the generator (e.g. a recorded tape in parity tests)."""


def categorical(
    probs: Tensor, generator: torch.Generator | None, uniform: UniformSource | None = None
) -> int:
    """One index drawn with probability proportional to ``probs`` (1-D, not necessarily normalised).

    Default: ``torch.multinomial`` from ``generator``. With ``uniform``: the inverse CDF over float64
    cumulative sums, ``#{k : C[k] <= u * C[-1]}`` (the rule the CosyVoice3 parity tapes record)."""
    if uniform is None:
        return int(torch.multinomial(probs, 1, replacement=True, generator=generator))
    cdf = torch.cumsum(probs.double(), dim=0)
    index = int((cdf <= float(uniform()) * cdf[-1]).sum())
    return min(index, probs.numel() - 1)


def nucleus_sample(
    logp: Tensor, top_p: float, top_k: int, generator: torch.Generator, uniform: UniformSource | None = None
) -> int:
    """Upstream's nucleus walk: over probs sorted descending (stable), take entries while the
    cumulative probability so far is < top_p and fewer than top_k are taken (so the entry that
    crosses top_p is included); draw one from the unnormalised taken probs (:func:`categorical`)."""
    head, order = _top_k_stable(logp.softmax(dim=0), top_k)
    # Sequential float32 sum, as upstream's Python loop accumulates (torch.cumsum uses doubles).
    cum = np.cumsum(head.numpy(), dtype=np.float32)
    taken = 1 + int(np.count_nonzero(cum[:-1] < np.float32(top_p)))
    pick = categorical(head[:taken], generator, uniform)
    return int(order[pick])


def _top_k_stable(probs: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The first `k` entries of ``probs.sort(descending=True, stable=True)`` (values, indices).

    A partial top-k is ~0.7 ms cheaper per decode step than sorting all 4097 entries; its order
    among equal values is unspecified, so any tie among the k + 1 largest falls back to the sort
    (the k-th/k+1-th tie decides which index is kept)."""
    if 0 < k < probs.numel():
        values, indices = probs.topk(k + 1, sorted=True)
        if bool((values[1:] < values[:-1]).all()):
            return values[:k], indices[:k]
    values, indices = probs.sort(descending=True, stable=True)
    return values[:k], indices[:k]


def ras_sampling(
    logp: Tensor,
    decoded: Sequence[int],
    generator: torch.Generator,
    cfg: SamplingConfig | None = None,
    uniform: UniformSource | None = None,
) -> int:
    """Repetition-aware sampling over one row of log-probs `[V]` (CPU, float32).

    Nucleus-sample; if the id occurs >= win_size * tau_r times among the last win_size emitted
    tokens, forbid it and redraw from the whole distribution. `logp` is not modified. Draws come
    from `generator`, or from `uniform` when given (see :func:`categorical`).
    """
    cfg = cfg or SamplingConfig()
    token = nucleus_sample(logp, cfg.top_p, cfg.top_k, generator, uniform)
    window = decoded[-cfg.win_size :] if cfg.win_size > 0 else ()
    repeats = sum(1 for t in window if t == token)
    if repeats >= cfg.win_size * cfg.tau_r:
        logp = logp.clone()
        logp[token] = float("-inf")
        token = categorical(logp.softmax(dim=0), generator, uniform)
    return token


def make_generator(seed: int | torch.Generator | None) -> torch.Generator:
    """A CPU generator: the given one, one seeded with `seed`, or a fresh non-deterministic one."""
    if isinstance(seed, torch.Generator):
        return seed
    gen = torch.Generator()
    if seed is None:
        gen.seed()  # OS entropy; leaves the global RNG alone
    else:
        gen.manual_seed(int(seed))
    return gen


class TokenSampler:
    """Per-request sampling state: generator, emitted tokens, EOS masking and the length limits.

    ``choose(logp_row)`` returns the next speech token id, or None when the request is finished
    (EOS drawn, or `max_len` tokens emitted). EOS is masked while fewer than `min_len` tokens were
    emitted and is never returned.
    """

    def __init__(
        self,
        eos_id: int,
        min_len: int,
        max_len: int,
        generator: torch.Generator | int | None = None,
        sampling: SamplingConfig | None = None,
    ):
        self.eos_id = eos_id
        self.min_len = min_len
        self.max_len = max_len
        self.generator = make_generator(generator)
        self.sampling = sampling or SamplingConfig()
        self.tokens: list[int] = []
        self.finished = max_len <= 0

    def choose(self, logp: Tensor) -> int | None:
        if self.finished:
            return None
        row = logp.detach().reshape(-1).to(device="cpu", dtype=torch.float32)
        if len(self.tokens) < self.min_len:
            row = row.clone()
            row[self.eos_id] = float("-inf")
        token = ras_sampling(row, self.tokens, self.generator, self.sampling)
        if token == self.eos_id:
            self.finished = True
            return None
        self.tokens.append(token)
        if len(self.tokens) >= self.max_len:
            self.finished = True
        return token
