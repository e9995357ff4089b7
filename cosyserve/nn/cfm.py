"""Conditional flow matching (upstream `ConditionalCFM`): cosine-scheduled Euler steps with
classifier-free guidance, the estimator run as a batch of two (conditional, unconditional).
Shared by the flows of every family; the estimator is pluggable."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from cosyserve.nn.config import CFMConfig, EstimatorConfig
from cosyserve.nn.unet import ConditionalDecoder

logger = logging.getLogger(__name__)

# `(x, mask, mu, t, spks, cond) -> [2B, 80, T]`: the signature an ONNX/TensorRT runner implements.
EstimatorFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


def cosine_t_span(n_timesteps: int, device: torch.device | None = None) -> Tensor:
    """`1 - cos(linspace(0, 1, n + 1) * pi / 2)` in float32, as upstream computes it."""
    t = torch.linspace(0, 1, n_timesteps + 1, device=device, dtype=torch.float32)
    return 1 - torch.cos(t * 0.5 * torch.pi)


class ConditionalCFM(nn.Module):
    """Conditional flow matching sampler (Euler, classifier-free guidance as a batch of two).

    The estimator is pluggable: `estimator` is the PyTorch U-Net (its parameters are the
    `decoder.estimator.*` checkpoint keys); set `estimator_runner` to any :data:`EstimatorFn`
    (ONNX Runtime, TensorRT, a recorder in tests) to run it instead.
    """

    def __init__(self, cfg: CFMConfig, estimator_cfg: EstimatorConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.t_scheduler != "cosine" or cfg.solver != "euler":
            raise ValueError(
                f"only the cosine t-schedule with the Euler solver is supported, got "
                f"{cfg.t_scheduler!r}/{cfg.solver!r}"
            )
        self.estimator = ConditionalDecoder(estimator_cfg)
        self.estimator_runner: EstimatorFn | None = None

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
    ) -> Tensor:
        """Integrate B requests at once: z, mu, cond `[B, 80, T]`, mask `[B, 1, T]`, spks `[B, 80]`.

        Each step calls the estimator once on a batch of 2B: rows `[:B]` conditional, rows `[B:]`
        unconditional (mu, spks, cond zeroed); `x += dt * ((1 + r) v_cond - r v_uncond)`.
        """
        n = n_timesteps or self.cfg.n_timesteps
        rate = self.cfg.inference_cfg_rate
        b, _, frames = z.shape
        dtype = spks.dtype
        t_span = cosine_t_span(n, z.device)

        # Estimator inputs built once; only x and t change per step (fixed buffers suit TensorRT).
        x_in = torch.empty((2 * b, z.shape[1], frames), device=z.device, dtype=dtype)
        mask_in = torch.cat([mask, mask]).to(dtype)
        mu_in = torch.cat([mu, torch.zeros_like(mu)]).to(dtype)
        spks_in = torch.cat([spks, torch.zeros_like(spks)]).to(dtype)
        cond_in = torch.cat([cond, torch.zeros_like(cond)]).to(dtype)
        t_in = torch.empty((2 * b,), device=z.device, dtype=dtype)

        x = z
        # t and dt accumulate in float32 exactly as upstream (t += dt; dt = t_span[k+1] - t).
        t = t_span[0:1]
        dt = t_span[1] - t_span[0]
        for step in range(1, n + 1):
            x_in[:b] = x
            x_in[b:] = x
            t_in[:] = t
            v = self.forward_estimator(x_in, mask_in, mu_in, t_in, spks_in, cond_in)
            v_cond, v_uncond = v[:b], v[b:]
            x = x + dt * ((1.0 + rate) * v_cond - rate * v_uncond)
            t = t + dt
            if step < n:
                dt = t_span[step + 1] - t
        return x.float()
