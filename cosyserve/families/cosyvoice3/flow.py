"""The CosyVoice3 flow: speech tokens -> 80-bin mel (`CausalMaskedDiffWithDiT`).

Pipeline: token embedding (prompt tokens first) -> pre-lookahead layer (each token sees the next
3; ``finalize=False``: the last 3 tokens are look-ahead context only) -> repeat each token
``token_mel_ratio`` (2) times -> ``mu``; conditional flow matching (cosine-scheduled Euler steps,
classifier-free guidance 0.7) over the DiT estimator, with the prompt mel as ``cond`` in the first
frames. There is no encoder after the lookahead layer (CosyVoice2 had a conformer). Module names
match the official ``flow.pt``, which loads with ``strict=True``.

Noise: the initial ODE state is the first T frames of one fixed buffer, upstream's
``rand_noise`` = ``manual_seed(0); randn(1, 80, 15000)`` (:func:`reference_flow_noise`), so a
request's mel depends only on its inputs. Streaming calls (``streaming=True``) restrict attention
to chunks of 50 frames (a frame sees its own chunk and all earlier ones); the last call of a
stream and non-streaming calls use full attention.

Batching: :meth:`CausalMaskedDiffWithDiT.prepare` does the per-request work; :meth:`decode` runs
the Euler loop for several prepared requests at once (estimator batch 2B). The DiT has no
statistics across frames and its convolutions are causal, so right-padding a shorter request
(key-padding mask) leaves its frames as in its solo run: requests of different lengths batch
exactly (up to float rounding), as long as they share the streaming flag.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from cosyserve.errors import UnsupportedModeError
from cosyserve.families.cosyvoice3.config import CONFIG_FILE, FlowConfig
from cosyserve.families.cosyvoice3.noise import check_flow_frames, reference_flow_noise
from cosyserve.nn.cfm import PreparedFlow, TokenFlow, check_cosine_euler, euler_cfg, solve_batch
from cosyserve.nn.checkpoint import load_into, read_checkpoint, skip_random_init
from cosyserve.nn.config import CFMConfig
from cosyserve.nn.dit import DiT, DiTConfig
from cosyserve.nn.lookahead import PreLookaheadLayer

logger = logging.getLogger(__name__)

# `(x, mask, mu, t, spks, cond) -> [2B, 80, T]`, and `streaming=True` as a keyword for chunk-masked
# calls: what an ONNX/TensorRT runner (or a recorder in tests) implements.
EstimatorFn = Callable[..., Tensor]


class CausalConditionalCFM(nn.Module):
    """Flow matching with the DiT estimator (upstream `CausalConditionalCFM`): Euler steps on the
    cosine schedule, classifier-free guidance as a batch of two, the fixed noise buffer.

    ``estimator`` holds the ``decoder.estimator.*`` weights; set ``estimator_runner`` to run an
    :data:`EstimatorFn` instead (it gets ``streaming=True`` as a keyword on streaming calls only).
    A runner without a ``streaming`` keyword (an ONNX / TensorRT export: full attention only)
    leaves streaming calls to the eager estimator, or refuses them once its weights are released.
    """

    def __init__(self, cfg: CFMConfig, dit_cfg: DiTConfig):
        super().__init__()
        check_cosine_euler(cfg)
        self.cfg = cfg
        self.estimator = DiT(dit_cfg)
        self.estimator_runner: EstimatorFn | None = None
        self._runner_streams: tuple[EstimatorFn, bool] | None = None  # (runner, takes `streaming`)

    @property
    def serves_eager_estimator(self) -> bool:
        """Whether some calls still run the PyTorch DiT (its weights must stay loaded): streaming
        calls do unless the runner takes ``streaming`` (the chunk masks an ONNX export lacks)."""
        runner = self.estimator_runner
        return runner is None or not takes_streaming(runner)

    @property
    def rand_noise(self) -> Tensor:
        """Upstream's fixed noise buffer ``[1, 80, 15000]`` (not a checkpoint tensor)."""
        return reference_flow_noise()

    def forward_estimator(
        self, x: Tensor, mask: Tensor, mu: Tensor, t: Tensor, spks: Tensor, cond: Tensor, streaming: bool
    ) -> Tensor:
        runner = self.estimator_runner
        if runner is None:
            return self.estimator(x, mask, mu, t, spks, cond, streaming=streaming)
        if not streaming:
            return runner(x, mask, mu, t, spks, cond)
        if self._runner_streams is None or self._runner_streams[0] is not runner:
            self._runner_streams = (runner, takes_streaming(runner))
        if self._runner_streams[1]:
            return runner(x, mask, mu, t, spks, cond, streaming=True)
        if self.estimator.proj_out.weight.is_meta:  # an acceleration plan released the weights
            raise UnsupportedModeError(
                "streaming needs the DiT's chunk-masked attention, which this server's estimator runner "
                "(an ONNX / TensorRT export) lacks: ask for non-streaming audio, or serve with "
                "--force_config cpu_fast"
            )
        return self.estimator(x, mask, mu, t, spks, cond, streaming=True)

    @torch.inference_mode()
    def solve_euler(
        self,
        z: Tensor,
        mu: Tensor,
        mask: Tensor,
        spks: Tensor,
        cond: Tensor,
        streaming: bool = False,
        n_timesteps: int | None = None,
    ) -> Tensor:
        """Integrate B requests at once: z, mu, cond ``[B, 80, T]``, mask ``[B, 1, T]``, spks
        ``[B, 80]``. Each step runs the estimator on 2B rows (``[:B]`` conditional, ``[B:]`` with
        mu, spks and cond zeroed); ``x += dt * ((1 + r) v_cond - r v_uncond)``."""
        n = n_timesteps or self.cfg.n_timesteps

        def run(x: Tensor, mask: Tensor, mu: Tensor, t: Tensor, spks: Tensor, cond: Tensor) -> Tensor:
            return self.forward_estimator(x, mask, mu, t, spks, cond, streaming)

        return euler_cfg(run, z.to(spks.dtype), mu, mask, spks, cond, n, self.cfg.inference_cfg_rate)


def takes_streaming(runner: EstimatorFn) -> bool:
    """Whether an estimator runner accepts the ``streaming`` keyword (chunk-masked attention)."""
    try:
        parameters = inspect.signature(runner).parameters.values()
    except (TypeError, ValueError):  # no introspectable signature: a plain 6-input runner
        return False
    return any(p.name == "streaming" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


@dataclass
class FlowInputs(PreparedFlow):
    """One request, ready for the Euler loop."""

    streaming: bool  # chunk-masked attention (a stream's non-final chunk)


class CausalMaskedDiffWithDiT(TokenFlow):
    """CosyVoice3 flow (`flow.pt`): speech tokens (+ optional prompt) -> mel ``[1, 80, T]``."""

    def __init__(self, cfg: FlowConfig):
        super().__init__(cfg)
        self.cfg = cfg
        self.token_mel_ratio = cfg.token_mel_ratio
        self.pre_lookahead_len = cfg.pre_lookahead_len
        pre = cfg.pre_lookahead
        self.pre_lookahead_layer = PreLookaheadLayer(pre.in_channels, pre.channels, pre.pre_lookahead_len)
        self.decoder = CausalConditionalCFM(cfg.cfm, cfg.dit)

    # -- per-request pieces -------------------------------------------------------------------

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        """Speech tokens ``[1, N]`` -> embeddings ``[1, N, C]`` (negative ids read as 0, as upstream)."""
        if tokens.numel() and int(tokens.max()) >= self.cfg.vocab_size:
            raise ValueError(
                f"speech token {int(tokens.max())} is outside the flow's vocabulary ({self.cfg.vocab_size})"
            )
        return self.input_embedding(torch.clamp(tokens, min=0))

    def lookahead(self, embedded: Tensor, finalize: bool) -> Tensor:
        """Pre-lookahead layer: ``[1, N, C]`` -> ``[1, N, C]`` (finalize: zeros after the last
        token) or ``[1, N - 3, C]`` (the last 3 tokens are look-ahead context only)."""
        if finalize:
            return self.pre_lookahead_layer(embedded)
        n = self.pre_lookahead_len
        return self.pre_lookahead_layer(embedded[:, :-n], context=embedded[:, -n:])

    @torch.inference_mode()
    def compute_mu(self, tokens: Tensor, prompt_tokens: Tensor, finalize: bool = True) -> Tensor:
        """Prompt + tokens -> ``mu`` ``[1, 80, 2 * (Np + N [- 3])]`` (channels-first)."""
        all_tokens = torch.cat([prompt_tokens, tokens], dim=1)
        if not finalize and all_tokens.shape[1] <= self.pre_lookahead_len:
            raise ValueError(
                f"a non-final flow call needs more than {self.pre_lookahead_len} tokens "
                f"(the last {self.pre_lookahead_len} are look-ahead only), got {all_tokens.shape[1]}"
            )
        h = self.lookahead(self.embed_tokens(all_tokens), finalize)
        return h.repeat_interleave(self.token_mel_ratio, dim=1).transpose(1, 2)

    @torch.inference_mode()
    def prepare(
        self,
        tokens: Tensor,
        prompt_tokens: Tensor | None,
        prompt_feat: Tensor | None,
        embedding: Tensor,
        streaming: bool = False,
        finalize: bool = True,
        noise: Tensor | None = None,
    ) -> FlowInputs:
        """Everything before the Euler loop for one request (batch 1).

        tokens ``[1, N]`` int (the whole token sequence so far: upstream re-runs the flow over
        all of them every streaming chunk); prompt_tokens ``[1, Np]`` (or None); prompt_feat
        ``[1, P, 80]`` time-major prompt mel (or None); embedding ``[1, 192]``. ``noise``
        ``[1, 80, T]`` replaces the fixed buffer (tests).
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
        mu = self.compute_mu(tokens, prompt_tokens.to(device), finalize)
        frames = mu.shape[2]
        if frames <= prompt_frames:
            raise ValueError(
                f"the flow makes {frames} mel frames for {prompt_tokens.shape[1] + tokens.shape[1]} tokens, "
                f"no more than the prompt's {prompt_frames}: nothing to synthesise"
            )
        check_flow_frames(frames)
        cond = torch.zeros_like(mu)
        cond[:, :, :prompt_frames] = prompt_feat.transpose(1, 2).to(dtype)
        if noise is None:
            z = self.decoder.rand_noise[:, :, :frames].to(device=device, dtype=dtype)
        else:
            if tuple(noise.shape) != tuple(mu.shape):
                raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(mu.shape)}")
            z = noise.to(device=device, dtype=dtype)
        return FlowInputs(mu=mu, spks=spks, cond=cond, z=z, prompt_frames=prompt_frames, streaming=streaming)

    # -- the Euler loop, batched over requests --------------------------------------------------

    @torch.inference_mode()
    def decode(self, items: Sequence[FlowInputs], n_timesteps: int | None = None) -> list[Tensor]:
        """Run the ODE for several prepared requests; returns each mel ``[1, 80, T_new]`` (prompt
        frames removed), in order. Items sharing the streaming flag share one Euler loop (shorter
        ones right-padded and masked)."""
        out: list[Tensor | None] = [None] * len(items)
        for streaming in (False, True):
            group = [i for i, it in enumerate(items) if it.streaming == streaming]
            if group:
                mels = solve_batch(
                    self.decoder.solve_euler, [items[i] for i in group], streaming, n_timesteps
                )
                for i, mel in zip(group, mels):
                    out[i] = mel
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def inference(
        self,
        tokens: Tensor,
        prompt_tokens: Tensor | None = None,
        prompt_feat: Tensor | None = None,
        embedding: Tensor | None = None,
        streaming: bool = False,
        finalize: bool = True,
        noise: Tensor | None = None,
    ) -> Tensor:
        """Tokens -> mel ``[1, 80, T]`` without the prompt frames (upstream ``inference``)."""
        if embedding is None:
            raise ValueError("the flow needs a speaker embedding [1, 192]")
        item = self.prepare(tokens, prompt_tokens, prompt_feat, embedding, streaming, finalize, noise)
        return self.decode([item])[0]


def load_flow(
    path: str | os.PathLike[str], cfg: FlowConfig, device: str | torch.device = "cpu"
) -> CausalMaskedDiffWithDiT:
    """Build the flow and load ``flow.pt`` strictly (memory-mapped, no second copy of the weights;
    an FP16 checkpoint gives FP32 parameters), with the DiT's q/k/v projections fused. Raises
    ModelDirectoryError naming the file."""
    path = Path(path)
    state_dict = read_checkpoint(path)
    with skip_random_init():
        flow = CausalMaskedDiffWithDiT(cfg)
    load_into(flow, state_dict, path, config_name=CONFIG_FILE)
    flow = flow.to(device).eval()
    flow.decoder.estimator.fuse_qkv()
    return flow
