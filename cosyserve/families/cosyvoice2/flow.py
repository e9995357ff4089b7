"""The CosyVoice2 flow: 25 Hz speech tokens -> 50 Hz 80-bin mel (`CausalMaskedDiffWithXvec`).

Pipeline: token embedding -> :class:`UpsampleConformerEncoder` (embed, pre-lookahead layer,
conformer blocks, nearest x2 up-layer, up_embed, 4 more blocks, after_norm) -> `encoder_proj` ->
conditional flow matching (:class:`~cosyserve.nn.cfm.CausalConditionalCFM` over the causal U-Net
:class:`~cosyserve.nn.causal_unet.CausalConditionalDecoder`). Module names match the official
`flow.pt`, which loads with ``strict=True``.

Two flags shape a call, as upstream's `inference(streaming, finalize)`:

* ``streaming``: block-causal attention (chunks of 25 tokens in the encoder, 50 frames after its
  up-layer and in the estimator), so a chunk's frames do not depend on later chunks; False = full
  attention.
* ``finalize``: False = the last 3 tokens are only the pre-lookahead context of the others and
  make no frames (a streamed chunk that is not the last); True = every token makes frames.

No randomness: the ODE starts from a slice of the fixed noise buffer
(:func:`~cosyserve.nn.cfm.fixed_flow_noise`), so identical calls give identical mels.

Batching: :meth:`CausalMaskedDiffWithXvec.prepare` does the per-request work (encoder, conditions,
noise); :meth:`CausalMaskedDiffWithXvec.decode` runs the Euler loop of several prepared requests
at once (estimator batch 2B). Only calls with the same ``streaming`` flag share a loop (they attend
differently); equal lengths give each request exactly its solo result, unequal ones are padded
and masked (approximately equal, as in v1).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cosyserve.families.cosyvoice2.config import CausalFlowConfig, UpsampleEncoderConfig
from cosyserve.nn.causal_unet import CausalConditionalDecoder
from cosyserve.nn.cfm import CausalConditionalCFM, PreparedFlow, TokenFlow, solve_batch
from cosyserve.nn.conformer import EncoderLayer, LinearInput, chunk_attention_mask
from cosyserve.nn.lookahead import PreLookaheadLayer

logger = logging.getLogger(__name__)


class NearestUpsample1D(nn.Module):
    """Repeat every frame `stride` times, left zero pad `2 stride`, Conv1d(k = 2 stride + 1)
    (key `conv`): causal up-sampling of `[B, C, T]` to `[B, C, stride T]`."""

    def __init__(self, channels: int, stride: int = 2):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(channels, channels, 2 * stride + 1)

    def forward(self, x: Tensor) -> Tensor:
        # repeat_interleave == F.interpolate(mode="nearest") for an integer factor.
        h = x.repeat_interleave(self.stride, dim=2)
        return self.conv(F.pad(h, (2 * self.stride, 0)))


class UpsampleConformerEncoder(nn.Module):
    """The flow encoder: tokens `[B, T, D]` (unpadded) -> `[B, stride T, D]`.

    Relative positions only depend on distances, so the lookahead context needs no positional
    offset: it goes through the same `embed` as the tokens.
    """

    def __init__(self, cfg: UpsampleEncoderConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.output_size
        self.embed = LinearInput(cfg.input_size, d, legacy=False)
        self.pre_lookahead_layer = PreLookaheadLayer(d, d, cfg.pre_lookahead_len)
        self.encoders = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_blocks))
        self.up_layer = NearestUpsample1D(d, cfg.up_stride)
        self.up_embed = LinearInput(cfg.input_size, d, legacy=False)
        self.up_encoders = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_up_blocks))
        self.after_norm = nn.LayerNorm(d, eps=1e-5)

    @property
    def pre_lookahead_len(self) -> int:
        return self.cfg.pre_lookahead_len

    @property
    def up_stride(self) -> int:
        return self.cfg.up_stride

    def token_blocks(self, xs: Tensor, context: Tensor | None = None, streaming: bool = False) -> Tensor:
        """embed -> pre-lookahead (with `context` `[B, n, D]`, the raw embeddings of up to 3
        following tokens) -> the token-rate conformer blocks. `[B, T, D]` -> `[B, T, D]`."""
        h = self.embed(xs)
        ctx = self.embed(context) if context is not None and context.shape[1] > 0 else None
        h = self.pre_lookahead_layer(h, ctx)
        allowed = (
            chunk_attention_mask(h.shape[1], self.cfg.static_chunk_size, h.device) if streaming else None
        )
        for i, layer in enumerate(self.encoders):
            h = layer(h, allowed, None, i)
        return h

    def frame_blocks(self, h: Tensor, streaming: bool = False) -> Tensor:
        """up-layer -> up_embed -> the frame-rate conformer blocks -> after_norm."""
        h = self.up_layer(h.transpose(1, 2)).transpose(1, 2)
        h = self.up_embed(h)
        chunk = self.cfg.static_chunk_size * self.cfg.up_stride
        allowed = chunk_attention_mask(h.shape[1], chunk, h.device) if streaming else None
        for i, layer in enumerate(self.up_encoders):
            h = layer(h, allowed, None, i)
        return self.after_norm(h)

    def forward(self, xs: Tensor, context: Tensor | None = None, streaming: bool = False) -> Tensor:
        return self.frame_blocks(self.token_blocks(xs, context, streaming), streaming)


@dataclass
class CausalFlowInputs(PreparedFlow):
    """One request, ready for the Euler loop; `z` is the head of the fixed noise (shared storage:
    never modified)."""

    streaming: bool


class CausalMaskedDiffWithXvec(TokenFlow):
    """CosyVoice2 flow (`flow.pt`): speech tokens (+ optional prompt) -> mel `[1, 80, T]`."""

    def __init__(self, cfg: CausalFlowConfig):
        super().__init__(cfg)
        self.cfg = cfg
        self.token_mel_ratio = cfg.token_mel_ratio
        self.pre_lookahead_len = cfg.pre_lookahead_len
        self.encoder = UpsampleConformerEncoder(cfg.encoder)
        self.encoder_proj = nn.Linear(cfg.encoder.output_size, cfg.output_size)
        self.decoder = CausalConditionalCFM(cfg.cfm, CausalConditionalDecoder(cfg.estimator))

    # -- sizes ----------------------------------------------------------------------------------

    def mel_frames(self, n_tokens: int, finalize: bool = True) -> int:
        """Mel frames made for `n_tokens` tokens (prompt tokens included): the last
        `pre_lookahead_len` tokens of a non-final call make none."""
        n = n_tokens if finalize else n_tokens - self.pre_lookahead_len
        return max(n, 0) * self.token_mel_ratio

    # -- per-request pieces -------------------------------------------------------------------

    def encode(self, tokens: Tensor, streaming: bool = False, finalize: bool = True) -> Tensor:
        """Speech tokens `[1, N]` (prompt included) -> encoder output `[1, mel_frames(N), D]`."""
        x = self.input_embedding(torch.clamp(tokens, min=0))
        if finalize:
            return self.encoder(x, None, streaming)
        if tokens.shape[1] <= self.pre_lookahead_len:
            raise ValueError(
                f"a non-final flow call needs more than {self.pre_lookahead_len} tokens, got {tokens.shape[1]}"
            )
        split = tokens.shape[1] - self.pre_lookahead_len
        return self.encoder(x[:, :split], x[:, split:], streaming)

    @torch.inference_mode()
    def compute_mu(
        self, tokens: Tensor, prompt_tokens: Tensor | None, streaming: bool = False, finalize: bool = True
    ) -> Tensor:
        """Encoder + projection -> `mu` `[1, 80, T]` (channels-first, prompt frames included)."""
        if prompt_tokens is not None and prompt_tokens.shape[1] > 0:
            tokens = torch.cat([prompt_tokens.to(tokens.device), tokens], dim=1)
        return self.encoder_proj(self.encode(tokens, streaming, finalize)).transpose(1, 2)

    @torch.inference_mode()
    def prepare(
        self,
        tokens: Tensor,
        prompt_tokens: Tensor | None,
        prompt_feat: Tensor | None,
        embedding: Tensor,
        streaming: bool = False,
        finalize: bool = True,
    ) -> CausalFlowInputs:
        """Everything before the Euler loop for one request (batch 1).

        tokens `[1, N]` int; prompt_tokens `[1, Np]` (or None); prompt_feat `[1, P, 80]`
        time-major prompt mel (or None; P is normally 2 Np); embedding `[1, 192]`.
        """
        self.check_tokens(tokens)
        device = tokens.device
        dtype = self.spk_embed_affine_layer.weight.dtype  # float32, or float16 when halved
        spks = self.speaker_projection(embedding.to(device=device, dtype=dtype))
        mu = self.compute_mu(tokens, prompt_tokens, streaming, finalize)
        prompt_frames = 0 if prompt_feat is None else prompt_feat.shape[1]
        if prompt_frames >= mu.shape[2]:
            raise ValueError(
                f"the prompt mel has {prompt_frames} frames but prompt + tokens make only {mu.shape[2]}"
            )
        cond = torch.zeros_like(mu)
        if prompt_frames:
            cond[:, :, :prompt_frames] = prompt_feat.to(device=device, dtype=mu.dtype).transpose(1, 2)  # type: ignore[union-attr]
        z = self.decoder.fixed_noise(mu.shape[2], device, mu.dtype)
        return CausalFlowInputs(
            mu=mu, spks=spks, cond=cond, z=z, prompt_frames=prompt_frames, streaming=streaming
        )

    # -- the Euler loop, batched over requests --------------------------------------------------

    @torch.inference_mode()
    def decode(self, items: Sequence[CausalFlowInputs], n_timesteps: int | None = None) -> list[Tensor]:
        """Run the ODE for several prepared requests in one batch; returns each mel `[1, 80, T_new]`
        (prompt frames removed)."""
        if not items:
            return []
        streaming = items[0].streaming
        if any(it.streaming != streaming for it in items):
            raise ValueError("streaming and non-streaming flow calls cannot share an Euler loop")
        return solve_batch(self.decoder.solve_euler, items, n_timesteps, streaming=streaming)

    @torch.inference_mode()
    def inference(
        self,
        tokens: Tensor,
        prompt_tokens: Tensor | None = None,
        prompt_feat: Tensor | None = None,
        embedding: Tensor | None = None,
        streaming: bool = False,
        finalize: bool = True,
    ) -> Tensor:
        """Tokens -> mel `[1, 80, T]` without the prompt frames (upstream's `flow.inference`)."""
        if embedding is None:
            raise ValueError("the flow needs a speaker embedding [1, 192]")
        item = self.prepare(tokens, prompt_tokens, prompt_feat, embedding, streaming, finalize)
        return self.decode([item])[0]
