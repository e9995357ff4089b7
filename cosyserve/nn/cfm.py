"""Conditional flow matching (upstream `ConditionalCFM`): cosine-scheduled Euler steps with
classifier-free guidance, the estimator run as a batch of two (conditional, unconditional).
Shared by the flows of every family; the estimator is pluggable.

:class:`CausalConditionalCFM` (CosyVoice2 and later) starts every ODE from a slice of one fixed
noise tensor instead of a fresh draw, and runs its estimator block-causally in streaming calls.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cosyserve.errors import InvalidRequestError
from cosyserve.nn.config import CFMConfig, EstimatorConfig
from cosyserve.nn.unet import ConditionalDecoder

logger = logging.getLogger(__name__)

# `(x, mask, mu, t, spks, cond) -> [2B, 80, T]`: the signature an ONNX/TensorRT runner implements.
EstimatorFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


def cosine_t_span(n_timesteps: int, device: torch.device | None = None) -> Tensor:
    """`1 - cos(linspace(0, 1, n + 1) * pi / 2)` in float32, as upstream computes it."""
    t = torch.linspace(0, 1, n_timesteps + 1, device=device, dtype=torch.float32)
    return 1 - torch.cos(t * 0.5 * torch.pi)


def check_cosine_euler(cfg: CFMConfig) -> None:
    """Raise ValueError unless `cfg` asks for the one sampler served: cosine t-schedule, Euler."""
    if cfg.t_scheduler != "cosine" or cfg.solver != "euler":
        raise ValueError(
            f"only the cosine t-schedule with the Euler solver is supported, got "
            f"{cfg.t_scheduler!r}/{cfg.solver!r}"
        )


def euler_cfg(
    run: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor], Tensor],
    z: Tensor,
    mu: Tensor,
    mask: Tensor,
    spks: Tensor,
    cond: Tensor,
    n_timesteps: int,
    rate: float,
) -> Tensor:
    """The Euler loop with classifier-free guidance, for B requests at once: z, mu, cond
    `[B, 80, T]`, mask `[B, 1, T]`, spks `[B, 80]`; returns float32 `[B, 80, T]`.

    Each step calls `run(x, mask, mu, t, spks, cond)` once on a batch of 2B: rows `[:B]`
    conditional, rows `[B:]` unconditional (mu, spks, cond zeroed);
    `x += dt * ((1 + rate) v_cond - rate v_uncond)`. The estimator inputs are in spks' dtype;
    `x` starts as `z` (its dtype as given).
    """
    n = n_timesteps
    b, _, frames = z.shape
    dtype = spks.dtype

    # Estimator inputs built once; only x and t change per step (fixed buffers suit TensorRT).
    x_in = torch.empty((2 * b, z.shape[1], frames), device=z.device, dtype=dtype)
    mask_in = torch.cat([mask, mask]).to(dtype)
    mu_in = torch.cat([mu, torch.zeros_like(mu)]).to(dtype)
    spks_in = torch.cat([spks, torch.zeros_like(spks)]).to(dtype)
    cond_in = torch.cat([cond, torch.zeros_like(cond)]).to(dtype)
    t_in = torch.empty((2 * b,), device=z.device, dtype=dtype)

    x = z
    for t, dt in euler_steps(n, z.device):
        x_in[:b] = x
        x_in[b:] = x
        t_in[:] = t
        v = run(x_in, mask_in, mu_in, t_in, spks_in, cond_in)
        v_cond, v_uncond = v[:b], v[b:]
        x = x + dt * ((1.0 + rate) * v_cond - rate * v_uncond)
    return x.float()


def euler_steps(n_timesteps: int, device: torch.device | None = None) -> list[tuple[Tensor, Tensor]]:
    """``(t, dt)`` of each Euler step on the cosine schedule, float32: t and dt accumulate exactly
    as upstream (``t += dt; dt = t_span[k + 1] - t``), so these are the very t values the estimator
    is called with (see :func:`euler_times`)."""
    t_span = cosine_t_span(n_timesteps, device)
    t = t_span[0:1]
    dt = t_span[1] - t_span[0]
    steps = []
    for step in range(1, n_timesteps + 1):
        steps.append((t, dt))
        t = t + dt
        if step < n_timesteps:
            dt = t_span[step + 1] - t
    return steps


def euler_times(n_timesteps: int) -> Tensor:
    """The t values ``[n_timesteps]`` (float32, CPU) that every Euler solve of ``n_timesteps``
    steps feeds the estimator, in step order (what a plan precomputes time conditioning for)."""
    return torch.cat([t for t, _ in euler_steps(n_timesteps)])


@dataclass
class PreparedFlow:
    """One request, ready for the Euler loop (channels-first, batch 1, T = prompt + new frames);
    each family's flow extends it with what its `prepare` adds (a streaming flag, a cache)."""

    mu: Tensor  # [1, 80, T]
    spks: Tensor  # [1, 80]
    cond: Tensor  # [1, 80, T]: prompt mel in the first `prompt_frames` frames, zeros after
    z: Tensor  # [1, 80, T] initial ODE state
    prompt_frames: int

    @property
    def frames(self) -> int:
        return self.mu.shape[2]


class FlowSizes(Protocol):
    """The sizes :class:`TokenFlow` reads from a family's flow config."""

    vocab_size: int
    input_size: int
    spk_embed_dim: int
    output_size: int
    input_frame_rate: int


class TokenFlow(nn.Module):
    """What every family's flow (speech tokens -> mel) begins with, under the checkpoint's names:
    `input_embedding` (speech token -> vector) and `spk_embed_affine_layer` (x-vector -> `spks`)."""

    def __init__(self, cfg: FlowSizes):
        super().__init__()
        self.output_size = cfg.output_size
        self.input_frame_rate = cfg.input_frame_rate
        self.input_embedding = nn.Embedding(cfg.vocab_size, cfg.input_size)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_embed_dim, cfg.output_size)

    def speaker_projection(self, embedding: Tensor) -> Tensor:
        """x-vector `[B, 192]` -> `spks` `[B, 80]` (L2-normalised first)."""
        return self.spk_embed_affine_layer(F.normalize(embedding, dim=1))

    @staticmethod
    def check_tokens(tokens: Tensor) -> None:
        """ValueError unless `tokens` is `[1, N]` with N > 0 (a flow call is batch 1)."""
        if tokens.dim() != 2 or tokens.shape[0] != 1 or tokens.shape[1] == 0:
            raise ValueError(f"tokens must be [1, N] with N > 0, got {tuple(tokens.shape)}")


def solve_batch(
    solve: Callable[..., Tensor], items: Sequence[PreparedFlow], *args: object, **kwargs: object
) -> list[Tensor]:
    """Run `solve(z, mu, mask, spks, cond, *args, **kwargs)` (a CFM's `solve_euler`) once for
    several prepared requests: shorter ones right-padded to the longest and masked. Returns each
    request's mel `[1, 80, T_new]` (prompt frames and padding removed), in order."""
    if len(items) == 1:
        it = items[0]
        mask = torch.ones((1, 1, it.frames), device=it.mu.device, dtype=it.mu.dtype)
        mel = solve(it.z, it.mu, mask, it.spks, it.cond, *args, **kwargs)
        return [mel[:, :, it.prompt_frames :]]
    frames = max(it.frames for it in items)

    def pad(x: Tensor) -> Tensor:
        return F.pad(x, (0, frames - x.shape[-1]))

    z = torch.cat([pad(it.z) for it in items])
    mu = torch.cat([pad(it.mu) for it in items])
    cond = torch.cat([pad(it.cond) for it in items])
    spks = torch.cat([it.spks for it in items])
    mask = torch.cat([pad(torch.ones_like(it.mu[:, :1])) for it in items])
    mel = solve(z, mu, mask, spks, cond, *args, **kwargs)
    return [mel[i : i + 1, :, it.prompt_frames : it.frames] for i, it in enumerate(items)]


class ConditionalCFM(nn.Module):
    """Conditional flow matching sampler (Euler, classifier-free guidance as a batch of two).

    The estimator is pluggable: `estimator` is the PyTorch U-Net (its parameters are the
    `decoder.estimator.*` checkpoint keys); set `estimator_runner` to any :data:`EstimatorFn`
    (ONNX Runtime, TensorRT, a recorder in tests) to run it instead.
    """

    def __init__(
        self, cfg: CFMConfig, estimator_cfg: EstimatorConfig | None = None, estimator: nn.Module | None = None
    ):
        """`estimator`: the network to use (a family's own); default: v1's U-Net built from `estimator_cfg`."""
        super().__init__()
        if estimator is None and estimator_cfg is None:
            raise ValueError("ConditionalCFM needs an estimator or the config to build v1's U-Net")
        check_cosine_euler(cfg)
        self.cfg = cfg
        self.estimator = estimator if estimator is not None else ConditionalDecoder(estimator_cfg)  # type: ignore[arg-type]
        self.estimator_runner: EstimatorFn | None = None

    @property
    def serves_eager_estimator(self) -> bool:
        """Whether some calls still run the PyTorch estimator (its weights must stay loaded)."""
        return self.estimator_runner is None

    def forward_estimator(
        self, x: Tensor, mask: Tensor, mu: Tensor, t: Tensor, spks: Tensor, cond: Tensor
    ) -> Tensor:
        run = self.estimator_runner or self.estimator
        return run(x, mask, mu, t, spks, cond)

    def draw_noise(
        self,
        shape: Sequence[int],
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | None = None,
    ) -> Tensor:
        """The initial ODE state: `noise` as given (already scaled; copied, never modified), else
        `randn(generator) * temperature`, drawn on the generator's device and moved to `device`
        (a request's CPU generator then gives the same noise on CPU and GPU)."""
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
            return noise.to(device=device, dtype=torch.float32).clone()
        draw_on = generator.device if generator is not None else device
        z = torch.randn(tuple(shape), generator=generator, device=draw_on, dtype=torch.float32)
        return z.to(device) * self.cfg.temperature

    @torch.inference_mode()
    def solve_euler(
        self,
        z: Tensor,
        mu: Tensor,
        mask: Tensor,
        spks: Tensor,
        cond: Tensor,
        n_timesteps: int | None = None,
        estimator: EstimatorFn | None = None,
    ) -> Tensor:
        """Integrate B requests at once: z, mu, cond `[B, 80, T]`, mask `[B, 1, T]`, spks `[B, 80]`.

        Each step calls the estimator once on a batch of 2B: rows `[:B]` conditional, rows `[B:]`
        unconditional (mu, spks, cond zeroed); `x += dt * ((1 + r) v_cond - r v_uncond)`.
        `estimator` replaces :meth:`forward_estimator` for this call.
        """
        run = estimator or self.forward_estimator
        n = n_timesteps or self.cfg.n_timesteps
        return euler_cfg(run, z, mu, mask, spks, cond, n, self.cfg.inference_cfg_rate)


# --------------------------------------------------------------------------------------------
# CosyVoice2 and later: the fixed noise and the chunk-aware estimator
# --------------------------------------------------------------------------------------------

FIXED_NOISE_SEED = 0
FIXED_NOISE_CHANNELS = 80
FIXED_NOISE_FRAMES = 50 * 300  # 300 s of 50 Hz mel frames


@functools.lru_cache(maxsize=1)
def fixed_flow_noise() -> Tensor:
    """Upstream's `CausalConditionalCFM.rand_noise` `[1, 80, 15000]` (CPU, float32).

    Upstream draws it with `torch.randn` right after seeding the global RNG with 0; the same
    values come from a private CPU generator seeded with 0, so the global RNG is never touched.
    Made on first use, once per process (read-only afterwards).
    """
    generator = torch.Generator(device="cpu").manual_seed(FIXED_NOISE_SEED)
    noise = torch.randn(
        (1, FIXED_NOISE_CHANNELS, FIXED_NOISE_FRAMES), generator=generator, dtype=torch.float32
    )
    logger.debug("fixed flow noise drawn (%d frames)", FIXED_NOISE_FRAMES)
    return noise


class CausalConditionalCFM(ConditionalCFM):
    """Flow matching of the chunk-aware flows (upstream `CausalConditionalCFM`).

    * The initial ODE state of a T-frame call is `fixed_flow_noise()[:, :, :T]` (times the
      temperature): identical calls give identical mels, and a stream, which re-runs the flow over
      all its tokens for every chunk, sees the same noise at the same frames each time.
    * `solve_euler(..., streaming=True)` runs the estimator with block-causal attention.

    Runner hooks: `estimator_runner` serves the full-attention calls (what the official
    `flow.decoder.estimator.fp32.onnx` computes: it was exported without the streaming flag);
    `streaming_estimator_runner` serves streaming calls. A streaming call never falls back to a
    full-attention runner: without a streaming runner it uses the PyTorch estimator.
    """

    def __init__(self, cfg: CFMConfig, estimator: nn.Module):
        super().__init__(cfg, estimator=estimator)
        self.streaming_estimator_runner: EstimatorFn | None = None
        self._noise_lock = threading.Lock()
        self._noise_on: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def fixed_noise(
        self, frames: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """`[1, 80, frames]`: the head of the fixed noise, times the temperature (a view of a
        per-device copy: do not modify it in place)."""
        if frames > FIXED_NOISE_FRAMES:
            raise InvalidRequestError(
                f"a flow call of {frames} mel frames is too long: the fixed noise covers "
                f"{FIXED_NOISE_FRAMES} frames ({FIXED_NOISE_FRAMES // 50} s); split the text into shorter segments"
            )
        key = (torch.device(device) if device is not None else torch.device("cpu"), dtype)
        noise = self._noise_on.get(key)
        if noise is None:
            with self._noise_lock:
                noise = self._noise_on.get(key)
                if noise is None:
                    noise = (fixed_flow_noise() * self.cfg.temperature).to(device=key[0], dtype=dtype)
                    self._noise_on[key] = noise
        return noise[:, :, :frames]

    @property
    def serves_eager_estimator(self) -> bool:
        return self.estimator_runner is None or self.streaming_estimator_runner is None

    def estimator_for(self, streaming: bool) -> EstimatorFn:
        """What runs the estimator for a call: a runner if one is set for this kind of call,
        else the PyTorch module (block-causal when streaming)."""
        if streaming:
            runner = self.streaming_estimator_runner
            return runner if runner is not None else functools.partial(self.estimator, streaming=True)
        return self.estimator_runner or self.estimator

    @torch.inference_mode()
    def solve_euler(  # type: ignore[override]
        self,
        z: Tensor,
        mu: Tensor,
        mask: Tensor,
        spks: Tensor,
        cond: Tensor,
        n_timesteps: int | None = None,
        estimator: EstimatorFn | None = None,
        streaming: bool = False,
    ) -> Tensor:
        """As :meth:`ConditionalCFM.solve_euler`; `streaming` picks the block-causal estimator."""
        return super().solve_euler(
            z, mu, mask, spks, cond, n_timesteps, estimator=estimator or self.estimator_for(streaming)
        )
