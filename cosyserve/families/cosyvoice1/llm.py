"""CosyVoice v1 `TransformerLM` (`llm.pt`): text (+ speaker, + prompt) -> speech tokens.

Layers and parameter names follow the official checkpoint. Decoding is split into small pieces so
an engine loop can drive many requests:

* :meth:`TransformerLM.build_prefix` -> the step-0 input `[1, L, D]`;
* :meth:`TransformerLM.prefill` / :meth:`TransformerLM.decode_step` -> log-probs `[B, 4097]`
  through a :class:`~cosyserve.nn.conformer.KVCache` (batchable: B rows, ragged lengths);
* :class:`TokenSampler` -> per-request sampling state (generator, emitted tokens, length limits);
* :meth:`TransformerLM.generate` -> the batch-1 loop, yielding token ids one at a time.

Sampling is upstream's `ras_sampling` (nucleus top-p/top-k plus a repetition-aware redraw), but
always from a per-request :class:`torch.Generator`, never the global RNG.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cosyserve.families.cosyvoice1.config import LLMConfig
from cosyserve.nn.config import SamplingConfig
from cosyserve.nn.conformer import Encoder, KVCache
from cosyserve.nn.sampling import TokenSampler

logger = logging.getLogger(__name__)

SOS_ID = 0  # row of llm_embedding used as start of sequence
TASK_ID = 1  # row of llm_embedding that separates the text from the speech tokens


def length_limits(n_text: int, cfg: LLMConfig) -> tuple[int, int]:
    """(min_len, max_len) in speech tokens for `n_text` TTS text tokens (prompt text excluded)."""
    return int(n_text * cfg.min_token_text_ratio), int(n_text * cfg.max_token_text_ratio)


# -- the model -----------------------------------------------------------------------------------


class TransformerLM(nn.Module):
    """Text encoder + decoder-only LLM over speech tokens (CosyVoice v1)."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.llm_input_size = cfg.llm_input_size
        self.speech_token_size = cfg.speech_token_size
        self.text_embedding = nn.Embedding(cfg.text_token_size, cfg.text_encoder_input_size)
        self.text_encoder = Encoder(cfg.text_encoder)
        self.text_encoder_affine_layer = nn.Linear(cfg.text_encoder.output_size, cfg.llm_input_size)
        self.llm_embedding = nn.Embedding(2, cfg.llm_input_size)
        self.llm = Encoder(cfg.llm)
        self.llm_decoder = nn.Linear(cfg.llm_output_size, cfg.speech_token_size + 1)
        self.speech_embedding = nn.Embedding(cfg.speech_token_size, cfg.llm_input_size)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_embed_dim, cfg.llm_input_size)

    @property
    def eos_id(self) -> int:
        return self.speech_token_size

    # -- prefix --------------------------------------------------------------------------------

    def encode_text(self, text_ids: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Token ids `[B, T]` (or `[T]`) -> `[B, T, llm_input_size]` (causal text encoder + affine)."""
        if text_ids.dim() == 1:
            text_ids = text_ids.unsqueeze(0)
        encoded, _ = self.text_encoder(self.text_embedding(text_ids), lengths)
        return self.text_encoder_affine_layer(encoded)

    def embed_speaker(self, embedding: Tensor | None) -> Tensor:
        """x-vector `[1, 192]` -> `[1, 1, D]`; None or an empty `(0, 192)` -> `[1, 0, D]` (slot omitted)."""
        ref = self.llm_embedding.weight
        if embedding is None or embedding.shape[0] == 0:
            return ref.new_zeros(1, 0, self.llm_input_size)
        embedding = embedding.to(device=ref.device, dtype=ref.dtype).reshape(-1, self.cfg.spk_embed_dim)
        return self.spk_embed_affine_layer(F.normalize(embedding, dim=1)).unsqueeze(1)

    def build_prefix(
        self,
        text_ids: Tensor,
        prompt_text_ids: Tensor | None = None,
        prompt_speech_tokens: Tensor | None = None,
        embedding: Tensor | None = None,
    ) -> Tensor:
        """`[sos, spk?, text_enc(prompt_text ++ text)..., task_id, speech_emb(prompt_speech)...]`.

        Ids may be `[T]` or `[1, T]`; returns `[1, L, llm_input_size]`.
        """
        weight = self.llm_embedding.weight
        ids = _as_row(text_ids, weight.device)
        if prompt_text_ids is not None and prompt_text_ids.numel():
            ids = torch.cat([_as_row(prompt_text_ids, weight.device), ids], dim=1)
        parts = [
            weight[SOS_ID].reshape(1, 1, -1),
            self.embed_speaker(embedding),
            self.encode_text(ids),
            weight[TASK_ID].reshape(1, 1, -1),
        ]
        if prompt_speech_tokens is not None and prompt_speech_tokens.numel():
            parts.append(self.speech_embedding(_as_row(prompt_speech_tokens, weight.device)))
        return torch.cat(parts, dim=1)

    # -- decoding (batchable) --------------------------------------------------------------------

    def new_cache(
        self, batch: int = 1, capacity: int = 256, pad: Tensor | Sequence[int] | None = None
    ) -> KVCache:
        return self.llm.new_cache(batch, capacity, pad=pad)

    def log_probs(self, hidden: Tensor) -> Tensor:
        """LLM output rows `[B, d]` -> log-probs `[B, speech_token_size + 1]` (last column = EOS)."""
        return self.llm_decoder(hidden).log_softmax(dim=-1)

    def prefill_hidden(self, lm_input: Tensor, cache: KVCache) -> Tensor:
        """Run the prefix `[B, L, D]` (left-padded to match `cache.pad` if ragged) into an empty
        cache; return the LLM output at the last position `[B, d]`."""
        return self.llm.forward_chunk(lm_input, cache)[:, -1]

    def step_hidden(self, tokens: Tensor, cache: KVCache) -> Tensor:
        """Feed one speech token per row (`[B]` int) -> LLM output `[B, d]` at the new position."""
        x = self.speech_embedding(tokens.reshape(-1, 1).to(self.speech_embedding.weight.device))
        return self.llm.forward_chunk(x, cache)[:, -1]

    # -- the batch runner's SpeechLM protocol (cosyserve.interfaces) ------------------------------

    def prefill_logp(self, prefixes: Tensor, cache: KVCache) -> Tensor:
        return self.log_probs(self.prefill_hidden(prefixes, cache))

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        return self.speech_embedding(tokens.reshape(-1, 1).to(self.speech_embedding.weight.device))

    def decode_embeddings(self, inputs: Tensor, cache: KVCache) -> Tensor:
        return self.log_probs(self.llm.forward_chunk(inputs, cache)[:, -1])

    def prefill(self, lm_input: Tensor, capacity: int | None = None) -> tuple[Tensor, KVCache]:
        """Batch-1 prefill: prefix `[1, L, D]` -> (log-probs `[1, V]` for token 0, cache)."""
        cache = self.new_cache(lm_input.shape[0], capacity or lm_input.shape[1] + 256)
        return self.log_probs(self.prefill_hidden(lm_input, cache)), cache

    def decode_step(self, tokens: Tensor, cache: KVCache) -> Tensor:
        """The batchable decode step: last tokens `[B]` + cache -> next log-probs `[B, V]`."""
        return self.log_probs(self.step_hidden(tokens, cache))

    # -- the batch-1 loop ------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self,
        text_ids: Tensor,
        *,
        prompt_text_ids: Tensor | None = None,
        prompt_speech_tokens: Tensor | None = None,
        embedding: Tensor | None = None,
        generator: torch.Generator | int | None = None,
        sampling: SamplingConfig | None = None,
        num_tokens: int | None = None,
        min_len: int | None = None,
        max_len: int | None = None,
    ) -> Iterator[int]:
        """Yield speech token ids one at a time (EOS is never yielded).

        Limits default to upstream's (`int(2 * n_text)`, `int(20 * n_text)` with n_text the TTS
        text tokens, prompt text excluded). `num_tokens=N` forces exactly N tokens (EOS masked, stop
        at N). The next LLM step runs only when the caller asks for the next token.
        """
        n_text = int(text_ids.numel())
        lo, hi = length_limits(n_text, self.cfg)
        if num_tokens is not None:
            lo = hi = int(num_tokens)
        lo = lo if min_len is None else int(min_len)
        hi = hi if max_len is None else int(max_len)
        sampler = TokenSampler(self.eos_id, lo, hi, generator, sampling or self.cfg.sampling)
        if sampler.finished:
            return
        lm_input = self.build_prefix(text_ids, prompt_text_ids, prompt_speech_tokens, embedding)
        # Room for the common case up front; the cache doubles if a request runs long.
        logp, cache = self.prefill(lm_input, capacity=lm_input.shape[1] + min(hi, max(lo, 256)) + 1)
        while True:
            token = sampler.choose(logp[0])
            if token is None:
                return
            yield token
            if sampler.finished:
                return
            logp = self.decode_step(torch.tensor([token], device=logp.device), cache)


def _as_row(ids: Tensor, device: torch.device) -> Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long, device=device)
    return ids.reshape(1, -1)
