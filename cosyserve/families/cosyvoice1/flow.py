"""The CosyVoice v1 flow: speech tokens -> 80-bin mel (`MaskedDiffWithXvec`).

Pipeline: token embedding -> Conformer encoder -> `encoder_proj` -> length regulation to mel frames
(`InterpolateRegulator`) -> conditional flow matching (`ConditionalCFM`: cosine-scheduled Euler
steps with classifier-free guidance over the U-Net estimator). Module names match the official
`flow.pt`, which loads with ``strict=True``.

Randomness: the only random draw is the initial ODE state `z`. It is either given (`noise=`) or
drawn from a per-request `torch.Generator`; the global RNG is never used.

Batching: :meth:`MaskedDiffWithXvec.prepare` does the per-request work (encoder, length regulation,
noise, streaming cache); :meth:`MaskedDiffWithXvec.decode` runs the Euler loop for several prepared
requests at once (estimator batch 2B). Requests of different lengths are padded and masked;
because GroupNorm statistics in the estimator include padded frames (as upstream), a padded
request matches its solo run only approximately.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cosyserve.families.cosyvoice1.config import FlowConfig, LengthRegulatorConfig
from cosyserve.nn.cfm import ConditionalCFM, PreparedFlow, TokenFlow, solve_batch
from cosyserve.nn.conformer import Encoder

logger = logging.getLogger(__name__)

MEL_SAMPLE_RATE = 22050  # upstream hard-codes the v1 mel rate in the flow
MEL_HOP = 256
TOKEN_OVERLAP = 20  # tokens; `token_overlap_len` of the streaming model, = the regulator's head/tail
SHORT_TOKENS = 2 * TOKEN_OVERLAP  # above this the token part is regulated as head/middle/tail


def token_frames(n_tokens: int, input_frame_rate: int = 50) -> int:
    """Mel frames made for `n_tokens` speech tokens (`int(n / rate * 22050 / 256)`)."""
    return int(n_tokens / input_frame_rate * MEL_SAMPLE_RATE / MEL_HOP)


OVERLAP_FRAMES = token_frames(TOKEN_OVERLAP)  # 34: the mel frames of the streaming overlap


def _interpolate(x: Tensor, frames: int) -> Tensor:
    """Linear interpolation (align_corners False) of `[B, C, T]` to `frames` frames."""
    return F.interpolate(x, size=frames, mode="linear")


class InterpolateRegulator(nn.Module):
    """Length regulator: linear interpolation to mel frames, then a conv stack.

    Keys `model.N`: `[Conv1d(k3) -> GroupNorm(1) -> Mish] x len(sampling_ratios)`, `Conv1d(k1)`.
    """

    def __init__(self, cfg: LengthRegulatorConfig, out_channels: int | None = None):
        super().__init__()
        ch = cfg.channels
        layers: list[nn.Module] = []
        for _ in cfg.sampling_ratios:
            layers += [nn.Conv1d(ch, ch, 3, 1, 1), nn.GroupNorm(1, ch), nn.Mish()]
        layers.append(nn.Conv1d(ch, out_channels or ch, 1, 1))
        self.model = nn.Sequential(*layers)

    def inference(
        self,
        h_prompt: Tensor,
        h_tokens: Tensor,
        prompt_frames: int,
        frames: int,
        input_frame_rate: int = 50,
    ) -> Tensor:
        """Regulate the prompt part and the token part separately (so the mel has a clean boundary).

        `h_prompt` `[B, Np, C]` (Np may be 0), `h_tokens` `[B, N, C]`, time-major as the encoder
        gives them; returns channels-first `[B, C, prompt_frames + frames]`.
        """
        x = h_tokens.transpose(1, 2)
        if x.shape[-1] > SHORT_TOKENS:
            # Head and tail are the streaming overlap: fixed 20 tokens -> 34 frames each.
            edge = token_frames(TOKEN_OVERLAP, input_frame_rate)
            parts = [
                _interpolate(x[:, :, :TOKEN_OVERLAP], edge),
                _interpolate(x[:, :, TOKEN_OVERLAP:-TOKEN_OVERLAP], frames - 2 * edge),
                _interpolate(x[:, :, -TOKEN_OVERLAP:], edge),
            ]
        else:
            parts = [_interpolate(x, frames)]
        if h_prompt.shape[1] != 0:
            parts.insert(0, _interpolate(h_prompt.transpose(1, 2), prompt_frames))
        return self.model(torch.cat(parts, dim=2))


def apply_cache(
    z: Tensor, mu: Tensor, cache: Tensor | None, prompt_frames: int, overlap: int = OVERLAP_FRAMES
) -> Tensor:
    """Streaming flow cache: fix the head of `z` / `mu` (in place) and build the next cache.

    `cache` `[1, 80, C, 2]` (`[..., 0]` = z, `[..., 1]` = mu) overwrites the first C frames;
    the returned cache is `[z[:P] ++ z[-overlap:]]` / same for mu, stacked on the last dim.
    """
    if cache is not None and cache.shape[2] != 0:
        c = cache.shape[2]
        z[:, :, :c] = cache[..., 0]
        mu[:, :, :c] = cache[..., 1]
    z_cache = torch.cat([z[:, :, :prompt_frames], z[:, :, -overlap:]], dim=2)
    mu_cache = torch.cat([mu[:, :, :prompt_frames], mu[:, :, -overlap:]], dim=2)
    return torch.stack([z_cache, mu_cache], dim=-1)


@dataclass
class FlowInputs(PreparedFlow):
    """One request, ready for the Euler loop; `mu` and `z` have the streaming cache applied."""

    cache: Tensor  # the flow cache to pass with the next chunk, [1, 80, prompt_frames + 34, 2]


class MaskedDiffWithXvec(TokenFlow):
    """CosyVoice v1 flow (`flow.pt`): speech tokens (+ optional prompt) -> mel `[1, 80, T]`."""

    def __init__(self, cfg: FlowConfig):
        super().__init__(cfg)
        self.cfg = cfg
        self.encoder = Encoder(cfg.encoder)
        self.encoder_proj = nn.Linear(cfg.encoder.output_size, cfg.output_size)
        self.length_regulator = InterpolateRegulator(cfg.length_regulator)
        self.decoder = ConditionalCFM(cfg.cfm, cfg.estimator)

    # -- per-request pieces -------------------------------------------------------------------

    def encode(self, tokens: Tensor) -> Tensor:
        """Speech tokens `[1, N]` -> encoder output `[1, N, D]` (after its final LayerNorm)."""
        # Batch 1 without padding: upstream's token mask is all ones, so no mask is needed.
        x = self.input_embedding(torch.clamp(tokens, min=0))
        return self.encoder(x)[0]

    @torch.inference_mode()
    def compute_mu(self, tokens: Tensor, prompt_tokens: Tensor, prompt_frames: int) -> Tensor:
        """Encoder + projection + length regulation -> `mu` `[1, 80, prompt_frames + T_new]`."""
        n_prompt = prompt_tokens.shape[1]
        h = self.encoder_proj(self.encode(torch.cat([prompt_tokens, tokens], dim=1)))
        frames = token_frames(tokens.shape[1], self.input_frame_rate)
        return self.length_regulator.inference(
            h[:, :n_prompt], h[:, n_prompt:], prompt_frames, frames, self.input_frame_rate
        )

    @torch.inference_mode()
    def prepare(
        self,
        tokens: Tensor,
        prompt_tokens: Tensor | None,
        prompt_feat: Tensor | None,
        embedding: Tensor,
        flow_cache: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> FlowInputs:
        """Everything before the Euler loop for one request (batch 1).

        tokens `[1, N]` int; prompt_tokens `[1, Np]` (or None); prompt_feat `[1, P, 80]`
        time-major prompt mel (or None); embedding `[1, 192]`; flow_cache `[1, 80, C, 2]` from the
        previous streaming chunk (or None); noise `[1, 80, P + T]` to inject, else drawn from
        `generator`.
        """
        self.check_tokens(tokens)
        device = tokens.device
        dtype = self.spk_embed_affine_layer.weight.dtype  # float32, or float16 when halved
        if prompt_tokens is None:
            prompt_tokens = torch.zeros((1, 0), dtype=torch.long, device=device)
        if prompt_feat is None:
            prompt_feat = torch.zeros((1, 0, self.output_size), device=device, dtype=dtype)
        prompt_frames = prompt_feat.shape[1]

        spks = self.speaker_projection(embedding.to(device=device, dtype=dtype))
        mu = self.compute_mu(tokens, prompt_tokens, prompt_frames)
        cond = torch.zeros_like(mu)
        cond[:, :, :prompt_frames] = prompt_feat.transpose(1, 2)
        # Noise is drawn (in float32) before the cache overwrites its head (the recorded contract).
        z = self.decoder.draw_noise(mu.shape, noise, generator, device).to(dtype)
        if flow_cache is not None:
            flow_cache = flow_cache.to(dtype)
        cache = apply_cache(z, mu, flow_cache, prompt_frames)
        return FlowInputs(mu=mu, spks=spks, cond=cond, z=z, prompt_frames=prompt_frames, cache=cache)

    # -- the Euler loop, batched over requests --------------------------------------------------

    @torch.inference_mode()
    def decode(self, items: Sequence[FlowInputs], n_timesteps: int | None = None) -> list[Tensor]:
        """Run the ODE for several prepared requests in one batch; returns each mel `[1, 80, T_new]`
        (prompt frames removed)."""
        return solve_batch(self.decoder.solve_euler, items, n_timesteps)

    @torch.inference_mode()
    def inference(
        self,
        tokens: Tensor,
        prompt_tokens: Tensor | None = None,
        prompt_feat: Tensor | None = None,
        embedding: Tensor | None = None,
        flow_cache: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Tokens -> (mel `[1, 80, T]` without the prompt frames, flow cache for the next chunk)."""
        if embedding is None:
            raise ValueError("the flow needs a speaker embedding [1, 192]")
        item = self.prepare(tokens, prompt_tokens, prompt_feat, embedding, flow_cache, noise, generator)
        return self.decode([item])[0], item.cache
