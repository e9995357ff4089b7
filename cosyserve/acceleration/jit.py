"""JIT for the LLM and the flow: official TorchScript files, torch.compile, CUDA graphs.

* **TorchScript files of official model directories** (``llm.text_encoder.{fp16|fp32}.zip``,
  ``llm.llm.{fp16|fp32}.zip``, ``flow.encoder.fp32.zip``): loaded with ``torch.jit.load`` and
  adapted to our module interfaces, but only after they reproduce the eager module on a random
  input; otherwise they are refused (logged and reported) and the eager module stays.
* **CUDA graphs for the LLM decode step** (:class:`GraphedDecoder`): the decode step rewritten with
  static shapes (KV buffers of a fixed capacity, the position as a tensor, future slots masked),
  captured once per capacity bucket and replayed; on CPU the same static step runs uncaptured
  (that is how its numerics are tested against the eager step).
* **torch.compile** for the estimator on CUDA (dynamic frame axis). On CPU it is not used: ONNX
  Runtime measured faster for the estimator on our 2-core machine.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cosyserve.errors import AcceleratorUnavailableError
from cosyserve.nn.conformer import KVCache

logger = logging.getLogger(__name__)

VERIFY_FRAMES = 23  # length of the random check input (odd on purpose)


def jit_file(model_dir: str | os.PathLike[str], part: str, fp16: bool) -> Path | None:
    """The official TorchScript file for `part` ("llm.text_encoder", "llm.llm", "flow.encoder")."""
    # Upstream loads the flow encoder in fp32 even with --fp16; the LLM parts follow --fp16.
    precisions = ["fp32"] if part == "flow.encoder" else (["fp16"] if fp16 else ["fp32"])
    for precision in precisions:
        path = Path(model_dir) / f"{part}.{precision}.zip"
        if path.is_file():
            return path
    return None


# ------------------------------------------------------------------------------ TorchScript


class ScriptedEncoder(nn.Module):
    """Our `Encoder.forward(xs, mask)` interface over an upstream scripted encoder
    (``forward(xs, xs_lens, decoding_chunk_size, num_decoding_left_chunks) -> (out, mask)``)."""

    def __init__(self, scripted: Any, eager: nn.Module):
        super().__init__()
        self.scripted = scripted
        self.cfg = eager.cfg
        self.causal = eager.causal
        self.after_norm = eager.after_norm  # dtype/device reference for callers

    @property
    def output_size(self) -> int:
        return self.cfg.output_size

    def forward(self, xs: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        batch, total, _ = xs.shape
        if mask is None:
            lengths = torch.full((batch,), total, dtype=torch.int32, device=xs.device)
        elif mask.dtype == torch.bool:
            lengths = mask.sum(dim=1).to(torch.int32)
        else:
            lengths = mask.to(device=xs.device, dtype=torch.int32).reshape(batch)
        dtype = next(iter(self.scripted.parameters())).dtype if list(self.scripted.parameters()) else xs.dtype
        # The text encoder is causal via upstream's chunk size 1 (static_chunk_size: 1).
        chunk = 1 if self.causal else 0
        out, out_mask = self.scripted(xs.to(dtype), lengths, chunk, -1)
        return out.to(xs.dtype), out_mask


class ScriptedLLM(nn.Module):
    """Our `Encoder.forward_chunk(xs, cache)` over upstream's scripted ``llm.llm`` (batch 1):
    ``forward_chunk(xs, offset, required_cache_size, att_cache, cnn_cache, att_mask)`` with
    ``att_cache`` ``[layers, heads, T, 2 d_k]``, kept on the KVCache object."""

    def __init__(self, scripted: Any, eager: nn.Module):
        super().__init__()
        self.scripted = scripted
        self.eager = eager  # new_cache, cfg and the full-sequence forward stay eager

    @property
    def cfg(self) -> Any:
        return self.eager.cfg

    @property
    def after_norm(self) -> nn.Module:
        return self.eager.after_norm

    def new_cache(self, *args: Any, **kwargs: Any) -> KVCache:
        return self.eager.new_cache(*args, **kwargs)

    def forward(self, xs: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.eager(xs, mask)

    def forward_chunk(self, xs: Tensor, cache: KVCache) -> Tensor:
        batch, n, _ = xs.shape
        if batch != 1:
            raise AcceleratorUnavailableError("the TorchScript llm.llm file decodes one request at a time")
        att_cache = getattr(cache, "_jit_att_cache", None)
        if att_cache is None:
            heads = self.cfg.attention_heads
            att_cache = (
                torch.zeros((0, 0, 0, 0), device=xs.device, dtype=xs.dtype)
                if cache.length == 0
                else _kv_to_att_cache(cache, heads)
            )
        cnn_cache = torch.zeros((0, 0, 0, 0), device=xs.device, dtype=xs.dtype)
        att_mask = torch.tril(torch.ones((1, n, n), device=xs.device)).to(torch.bool)
        out, new_att, _ = self.scripted.forward_chunk(
            xs,
            offset=cache.length,
            required_cache_size=-1,
            att_cache=att_cache,
            cnn_cache=cnn_cache,
            att_mask=att_mask,
        )
        cache._jit_att_cache = new_att  # type: ignore[attr-defined]
        cache.length += n
        return out


def _kv_to_att_cache(cache: KVCache, heads: int) -> Tensor:
    layers = [
        torch.cat([k[0, :, : cache.length], v[0, :, : cache.length]], dim=-1)
        for k, v in zip(cache.k, cache.v)
    ]
    return torch.stack(layers)


@torch.inference_mode()
def _check_encoder(adapter: nn.Module, eager: nn.Module, rtol: float) -> float:
    param = next(eager.parameters())
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(1, VERIFY_FRAMES, eager.cfg.input_size, generator=gen).to(param)
    ref = eager(xs)[0].float()
    got = adapter(xs)[0].float()
    return float((got - ref).abs().max()) / max(1.0, float(ref.abs().max()))


@torch.inference_mode()
def _check_llm(adapter: ScriptedLLM, eager: nn.Module, rtol: float) -> float:
    param = next(eager.parameters())
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(1, VERIFY_FRAMES, eager.cfg.input_size, generator=gen).to(param)
    step = torch.randn(1, 1, eager.cfg.input_size, generator=gen).to(param)
    c_ref, c_got = eager.new_cache(1, VERIFY_FRAMES + 4), eager.new_cache(1, VERIFY_FRAMES + 4)
    ref = torch.cat([eager.forward_chunk(xs, c_ref), eager.forward_chunk(step, c_ref)], dim=1).float()
    got = torch.cat([adapter.forward_chunk(xs, c_got), adapter.forward_chunk(step, c_got)], dim=1).float()
    return float((got - ref).abs().max()) / max(1.0, float(ref.abs().max()))


def load_torchscript_parts(
    model_dir: str | os.PathLike[str], llm: nn.Module, flow: nn.Module, fp16: bool
) -> list[str]:
    """Swap in the official TorchScript files that are present and match; returns notes."""
    notes: list[str] = []
    rtol = 2e-2 if fp16 else 1e-3
    device = next(llm.parameters()).device
    parts: list[tuple[str, nn.Module, str, Callable[[Any, nn.Module], nn.Module], Callable[..., float]]] = [
        ("llm.text_encoder", llm, "text_encoder", ScriptedEncoder, _check_encoder),
        ("llm.llm", llm, "llm", ScriptedLLM, _check_llm),
        ("flow.encoder", flow, "encoder", ScriptedEncoder, _check_encoder),
    ]
    for part, owner, attr, adapter_cls, check in parts:
        path = jit_file(model_dir, part, fp16)
        if path is None:
            continue
        eager = getattr(owner, attr)
        try:
            scripted = torch.jit.load(str(path), map_location=device)
            scripted.eval()
            adapter = adapter_cls(scripted, eager)
            err = check(adapter, eager, rtol)
        except Exception as exc:  # noqa: BLE001 - a file from another version fails in many ways
            logger.warning("refusing %s: it cannot run as %s (%s)", path.name, part, exc)
            notes.append(f"refused {path.name}: {type(exc).__name__}")
            continue
        if not math.isfinite(err) or err > rtol:
            logger.warning(
                "refusing %s: output differs from the eager %s (relative error %.2e)", path.name, part, err
            )
            notes.append(f"refused {path.name}: mismatch {err:.1e}")
            continue
        setattr(owner, attr, adapter)
        notes.append(f"torchscript {path.name}")
        logger.info("using %s for %s (matches eager, relative error %.1e)", path.name, part, err)
    return notes


# ------------------------------------------------------------------------------ CUDA graphs


class _Graph:
    """Static inputs of one captured decode step, bound to one KVCache's tensors."""

    def __init__(self, cache: KVCache, key: tuple[Any, ...]):
        device = cache.k[0].device
        batch, capacity = cache.batch_size, cache.capacity
        self.key = key
        self.capacity = capacity
        self.token = torch.zeros((batch,), dtype=torch.long, device=device)
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self.pad = torch.zeros((batch,), dtype=torch.long, device=device)
        self.slots = torch.arange(capacity, device=device)
        self.graph: Any = None
        self.out: Tensor | None = None


class GraphedDecoder:
    """`TransformerLM.decode_step` with static shapes, replayed as a CUDA graph.

    The step attends over the cache's whole capacity with the position as a tensor (future and
    padded slots masked), so one captured graph serves every step until the cache's tensors
    change (a request joins or leaves the batch, or the cache grows): then it is captured again
    (tens of milliseconds, a few times per request against hundreds of replayed steps). The
    projected position table is shared by all rows: slot distances are the same in every row of
    a right-aligned cache. Prefill stays eager. Without CUDA the same static step runs uncaptured
    (how its numerics are tested against the eager step).
    """

    def __init__(self, llm: nn.Module, use_graphs: bool | None = None):
        self.llm = llm
        device = next(llm.parameters()).device
        self.use_graphs = device.type == "cuda" if use_graphs is None else use_graphs
        self._graph: _Graph | None = None
        self._pos_t: dict[int, list[Tensor]] = {}
        self._lock = threading.Lock()
        self.eager_decode_step = llm.decode_step
        self.captures = 0

    def _position_tables(self, capacity: int) -> list[Tensor]:
        """Per layer, linear_pos(table) for r = capacity-1 .. 0 as `[h, d_k, C]` (row i <-> r = C-1-i)."""
        tables = self._pos_t.get(capacity)
        if tables is None:
            with torch.inference_mode():
                tables = [
                    layer.self_attn.position_window(capacity - 1, 0).transpose(1, 2).contiguous().clone()
                    for layer in self.llm.llm.encoders
                ]
            self._pos_t = {capacity: tables}  # one capacity at a time: caches grow, rarely shrink
        return tables

    def _step(self, g: _Graph, cache: KVCache) -> Tensor:
        """One decode step for all rows: reads g.token / g.pos / g.pad, writes slot g.pos of the cache."""
        llm = self.llm
        enc = llm.llm
        batch, cap = g.token.shape[0], g.capacity
        x = enc.embed(llm.speech_embedding(g.token).unsqueeze(1))  # [B, 1, d]
        tables = self._position_tables(cap)
        # Key j holds relative position r = pos - j: row C-1-pos+j of the window.
        gather = (g.slots + (cap - 1) - g.pos).clamp(max=cap - 1)
        blocked = (g.slots.unsqueeze(0) > g.pos) | (g.slots.unsqueeze(0) < g.pad.unsqueeze(1))
        blocked = blocked.view(batch, 1, 1, cap)
        index = g.pos.view(1)
        for i, layer in enumerate(enc.encoders):
            attn = layer.self_attn
            norm_attn, norm_ff = (layer._modules[name] for name in layer._norm_names)
            h = norm_attn(x)
            q, k, v = attn.project_qkv(h)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
            cache.k[i].index_copy_(2, index, k)
            cache.v[i].index_copy_(2, index, v)
            q_u = (q + attn.pos_bias_u).transpose(1, 2)  # [B, h, 1, d_k]
            q_v = (q + attn.pos_bias_v).transpose(1, 2)
            content = torch.matmul(q_u, cache.k[i].transpose(-2, -1))  # [B, h, 1, C]
            position = torch.matmul(q_v, tables[i].unsqueeze(0))  # [B, h, 1, C], window order
            position = position.gather(-1, gather.view(1, 1, 1, cap).expand_as(position))
            scores = ((content + position) / math.sqrt(attn.d_k)).masked_fill(blocked, float("-inf"))
            out = torch.matmul(torch.softmax(scores, dim=-1), cache.v[i])
            x = x + attn.linear_out(out.transpose(1, 2).reshape(batch, 1, attn.h * attn.d_k))
            x = x + layer.feed_forward(norm_ff(x))
        return llm.log_probs(enc.after_norm(x)[:, -1])

    def _prepare(self, cache: KVCache) -> _Graph:
        key = (id(cache), cache.batch_size, cache.capacity, cache.k[0].data_ptr(), cache.v[-1].data_ptr())
        g = self._graph
        if g is None or g.key != key:
            g = _Graph(cache, key)
            self._graph = None  # drop the old graph (and its memory pool) first
            if self.use_graphs:
                g.graph = "pending"
            self._graph = g
        return g

    @torch.inference_mode()
    def _capture(self, g: _Graph, cache: KVCache) -> None:
        # Warm-up launches (cuBLAS workspaces, lazy init) on a side stream, then capture. They
        # write the slot being decoded with this step's own inputs, so they change nothing.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(g, cache)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (ORT, a TensorRT stream) may use CUDA during the capture.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            g.out = self._step(g, cache)
        g.graph = graph
        self.captures += 1
        logger.debug("captured the LLM decode step (batch %d, capacity %d)", cache.batch_size, g.capacity)

    @torch.inference_mode()
    def decode_step(self, tokens: Tensor, cache: KVCache) -> Tensor:
        with self._lock:
            cache.reserve(1)
            g = self._prepare(cache)
            g.token.copy_(tokens.reshape(-1).to(g.token.device))
            g.pos.fill_(cache.length)
            if cache.pad is None:
                g.pad.zero_()
            else:
                g.pad.copy_(cache.pad)
            if g.graph == "pending":
                self._capture(g, cache)
            if g.graph is not None:
                g.graph.replay()
                out = g.out.clone()  # type: ignore[union-attr]
            else:
                out = self._step(g, cache)
            cache.length += 1
            return out


def install_graphed_decoder(llm: nn.Module, use_graphs: bool | None = None) -> GraphedDecoder:
    """Route the LLM's decode step through a :class:`GraphedDecoder` (an instance attribute)."""
    decoder = GraphedDecoder(llm, use_graphs)
    llm.decode_step = decoder.decode_step  # type: ignore[method-assign]
    llm.__dict__["graphed_decoder"] = decoder
    return decoder


# ------------------------------------------------------------------------------ torch.compile


def compile_estimator(cfm: Any) -> str:
    """torch.compile the flow sampler's estimator (CUDA): dynamic frame axis, so requests of new
    lengths reuse the compiled kernels instead of recompiling (CUDA graphs would re-record per
    length)."""
    estimator = cfm.estimator
    device = next(estimator.parameters()).device
    if device.type != "cuda":
        raise AcceleratorUnavailableError("torch.compile of the estimator is used on CUDA only")
    compiled = torch.compile(estimator, dynamic=True)
    cfm.estimator_runner = compiled
    return "torch.compile estimator (dynamic frames)"
