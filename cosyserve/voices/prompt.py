"""Prompt-recording processing for zero-shot / cross-lingual CosyVoice v1 (upstream
``CosyVoiceFrontEnd.frontend_zero_shot``).

From one recording the model needs three things:

* speaker embedding ``[1, 192]``: ``campplus.onnx`` on the mean-normalised 80-bin Kaldi fbank
  of the 16 kHz audio (``_extract_spk_embedding``);
* prompt speech tokens ``[1, N]`` (50 Hz): ``speech_tokenizer_v1.onnx`` on the 128-bin Whisper
  log-mel of the 16 kHz audio plus its frame count as int32 (``_extract_speech_token``);
* prompt mel features ``[1, T, 80]`` (~86 Hz): the flow's mel extractor on the 22,050 Hz audio.
  Current upstream resamples to 24 kHz here, a CosyVoice2 change that also hits v1; v1 was
  trained on 22,050 Hz features, so that is what we use.

Token/feature alignment: upstream trims tokens and features to an exact 1:2 ratio only for
24 kHz (CosyVoice2) models. For v1 nothing is trimmed: the flow's length regulator interpolates
the prompt part of its encoder output to exactly ``T`` frames, whatever ``N`` is. The optional
``token_mel_ratio`` reproduces the CosyVoice2 rule should a model need it.

The two ONNX sessions are created lazily, on the first zero-shot request, so an SFT-only server
never pays their memory.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cosyserve.api import PromptAudio
from cosyserve.audio.io import resample
from cosyserve.errors import InvalidRequestError, ModelDirectoryError, UnsupportedModeError
from cosyserve.nn.config import MelConfig
from cosyserve.nn.features import MelExtractor, campplus_features, whisper_log_mel

logger = logging.getLogger(__name__)

CAMPPLUS_FILE = "campplus.onnx"
SPEECH_TOKENIZER_FILE = "speech_tokenizer_v1.onnx"
TOKENIZER_SAMPLE_RATE = 16000
MIN_PROMPT_SECONDS = 1.0
MAX_PROMPT_SECONDS = 30.0  # the speech tokenizer sees at most one 30 s Whisper window
EMBEDDING_DIM = 192


@dataclass
class PromptFeatures:
    """Everything a zero-shot synthesis needs from a prompt recording (batch size 1)."""

    embedding: torch.Tensor  # [1, 192] float32: llm_embedding and flow_embedding
    speech_tokens: torch.Tensor  # [1, N] int64, 50 Hz
    speech_feat: torch.Tensor  # [1, T, 80] float32, 22,050 Hz / hop 256
    text: str | None = None  # transcript of the recording (None: cross-lingual only)

    def __post_init__(self) -> None:
        if self.embedding.dim() != 2 or self.embedding.shape[0] != 1:
            raise ValueError(f"embedding must be [1, D], got {tuple(self.embedding.shape)}")
        if self.speech_tokens.dim() != 2 or self.speech_tokens.shape[0] != 1:
            raise ValueError(f"speech_tokens must be [1, N], got {tuple(self.speech_tokens.shape)}")
        if self.speech_feat.dim() != 3 or self.speech_feat.shape[0] != 1:
            raise ValueError(f"speech_feat must be [1, T, mels], got {tuple(self.speech_feat.shape)}")

    @property
    def duration_s(self) -> float:
        """Prompt length as the speech tokens count it (50 per second)."""
        return self.speech_tokens.shape[1] / 50.0

    def to(self, device: torch.device | str) -> PromptFeatures:
        return PromptFeatures(
            embedding=self.embedding.to(device),
            speech_tokens=self.speech_tokens.to(device),
            speech_feat=self.speech_feat.to(device),
            text=self.text,
        )


def align_prompt_lengths(
    speech_feat: torch.Tensor, speech_tokens: torch.Tensor, token_mel_ratio: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream's CosyVoice2 rule (``frontend_zero_shot`` at 24 kHz): keep
    ``n = min(T // ratio, N)`` tokens and exactly ``ratio * n`` feature frames. ``None`` (v1):
    both are returned unchanged, as upstream does for 22,050 Hz models."""
    if token_mel_ratio is None:
        return speech_feat, speech_tokens
    n = min(speech_feat.shape[1] // token_mel_ratio, speech_tokens.shape[1])
    return speech_feat[:, : token_mel_ratio * n], speech_tokens[:, :n]


def _default_threads() -> int:
    # Prompt encoding is a short burst beside the engine loop; a few threads cut latency
    # without starving the LLM/flow steps running concurrently.
    return max(1, min(4, (os.cpu_count() or 1) // 2))


class PromptEncoder:
    """Turns a :class:`PromptAudio` (any sample rate) into :class:`PromptFeatures`.

    ``device``: where the returned tensors live (and whether the speech tokenizer may use the
    CUDA execution provider). Thread-safe: sessions are created once under a lock; ONNX Runtime
    runs are themselves thread-safe.
    """

    def __init__(
        self,
        model_dir: str | Path,
        mel_config: MelConfig | None = None,
        device: torch.device | str = "cpu",
        onnx_threads: int | None = None,
        token_mel_ratio: int | None = None,
        speech_tokenizer_file: str = SPEECH_TOKENIZER_FILE,
    ):
        self.model_dir = Path(model_dir)
        self.speech_tokenizer_file = speech_tokenizer_file
        self.mel_config = mel_config or MelConfig()
        self.device = torch.device(device)
        self.onnx_threads = onnx_threads or _default_threads()
        self.token_mel_ratio = token_mel_ratio
        self.mel = MelExtractor(self.mel_config)
        self._sessions: dict[str, object] = {}
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- ONNX sessions (lazy)

    @property
    def required_files(self) -> str:
        """The ONNX models cloning needs, for messages."""
        return f"{CAMPPLUS_FILE} and {self.speech_tokenizer_file}"

    @property
    def missing_files(self) -> list[str]:
        return [f for f in (CAMPPLUS_FILE, self.speech_tokenizer_file) if not (self.model_dir / f).is_file()]

    @property
    def available(self) -> bool:
        """Whether the model directory has both ONNX models (zero-shot is possible)."""
        return not self.missing_files

    @property
    def loaded(self) -> bool:
        return bool(self._sessions)

    def _providers(self, name: str) -> list[str]:
        import onnxruntime as ort

        # Upstream keeps the tiny CAM++ on CPU and puts the tokenizer on CUDA when available.
        if (
            name == self.speech_tokenizer_file
            and self.device.type == "cuda"
            and "CUDAExecutionProvider" in ort.get_available_providers()
        ):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def _session(self, name: str):
        session = self._sessions.get(name)
        if session is not None:
            return session
        with self._lock:
            session = self._sessions.get(name)
            if session is not None:
                return session
            missing = self.missing_files
            if missing:
                raise UnsupportedModeError(
                    f"zero-shot voice cloning needs {', '.join(missing)} in the model directory "
                    f"{self.model_dir}, which does not have it"
                )
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.intra_op_num_threads = self.onnx_threads
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            # No arena: prompt encoding is rare and the arena would keep its peak allocation.
            options.enable_cpu_mem_arena = False
            options.log_severity_level = 3
            path = self.model_dir / name
            try:
                session = ort.InferenceSession(
                    str(path), sess_options=options, providers=self._providers(name)
                )
            except Exception as exc:  # onnxruntime raises its own untyped exception classes
                raise ModelDirectoryError(f"cannot load {path}: {exc}") from exc
            logger.info("loaded %s (providers %s)", path, session.get_providers())
            self._sessions[name] = session
            return session

    def close(self) -> None:
        """Drop the ONNX sessions (they are recreated on the next :meth:`encode`)."""
        with self._lock:
            self._sessions.clear()

    # ---------------------------------------------------------------- the three extractors

    def speaker_embedding(self, wav16k: np.ndarray) -> torch.Tensor:
        """``[1, 192]`` CAM++ embedding of 16 kHz audio."""
        session = self._session(CAMPPLUS_FILE)
        feat = campplus_features(wav16k).unsqueeze(0).numpy()  # [1, frames, 80]
        out = session.run(None, {session.get_inputs()[0].name: feat})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32).reshape(1, -1).copy()).to(self.device)

    def speech_tokens(self, wav16k: np.ndarray) -> torch.Tensor:
        """``[1, N]`` int64 speech tokens of 16 kHz audio (at most 30 s)."""
        session = self._session(self.speech_tokenizer_file)
        feat = whisper_log_mel(
            torch.from_numpy(np.ascontiguousarray(wav16k, dtype=np.float32))[None], n_mels=128
        )
        inputs = session.get_inputs()
        out = session.run(
            None,
            {
                inputs[0].name: feat.numpy(),  # feats [1, 128, frames] float32
                inputs[1].name: np.array([feat.shape[2]], dtype=np.int32),  # feats_length
            },
        )[0]
        return torch.from_numpy(np.asarray(out).reshape(1, -1).astype(np.int64)).to(self.device)

    def speech_feat(self, wav: np.ndarray) -> torch.Tensor:
        """``[1, T, 80]`` prompt mel features of audio at ``mel_config.sampling_rate``."""
        mel = self.mel(torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))[None])  # [1, 80, T]
        return mel.transpose(1, 2).contiguous().to(self.device)

    # ---------------------------------------------------------------- public entry point

    @staticmethod
    def check_prompt(prompt: PromptAudio) -> np.ndarray:
        """Validate the recording; returns it as float32 mono. Raises InvalidRequestError."""
        audio = np.asarray(prompt.audio, dtype=np.float32)
        if audio.ndim == 2 and min(audio.shape) <= 8:
            audio = audio.mean(axis=int(np.argmin(audio.shape)))  # [channels, n] or [n, channels]
        if audio.ndim != 1:
            raise InvalidRequestError(
                f"prompt audio must be mono samples, got an array of shape {audio.shape}"
            )
        sr = prompt.sample_rate
        if (
            not isinstance(sr, (int, float, np.integer, np.floating))
            or not np.isfinite(sr)
            or sr <= 0
            or int(sr) != sr
        ):
            raise InvalidRequestError(f"prompt audio has an invalid sample rate: {sr!r}")
        duration = len(audio) / float(prompt.sample_rate)
        if duration < MIN_PROMPT_SECONDS:
            raise InvalidRequestError(
                f"the prompt recording is {duration:.2f} s long; it must be at least {MIN_PROMPT_SECONDS:g} s"
            )
        if duration > MAX_PROMPT_SECONDS:
            raise InvalidRequestError(
                f"the prompt recording is {duration:.1f} s long; the limit is {MAX_PROMPT_SECONDS:g} s "
                "(trim it to a few seconds of clean speech)"
            )
        if not np.all(np.isfinite(audio)):
            raise InvalidRequestError("the prompt recording contains NaN or infinite samples")
        if prompt.sample_rate < TOKENIZER_SAMPLE_RATE:
            logger.warning(
                "prompt audio at %d Hz is below 16 kHz; upsampled, but cloning quality will suffer",
                prompt.sample_rate,
            )
        return audio

    @torch.no_grad()
    def source_tokens(self, recording: PromptAudio) -> torch.Tensor:
        """``[1, N]`` speech tokens of a recording alone: the source of a voice conversion."""
        audio = self.check_prompt(recording)
        return self.speech_tokens(resample(audio, int(recording.sample_rate), TOKENIZER_SAMPLE_RATE))

    @torch.no_grad()
    def encode(self, prompt: PromptAudio) -> PromptFeatures:
        audio = self.check_prompt(prompt)
        sr = int(prompt.sample_rate)
        wav16k = resample(audio, sr, TOKENIZER_SAMPLE_RATE)
        wav_mel = resample(audio, sr, self.mel_config.sampling_rate)
        speech_feat = self.speech_feat(wav_mel)
        tokens = self.speech_tokens(wav16k)
        embedding = self.speaker_embedding(wav16k)
        speech_feat, tokens = align_prompt_lengths(speech_feat, tokens, self.token_mel_ratio)
        text = prompt.text if prompt.text and prompt.text.strip() else None
        logger.debug(
            "prompt %.2f s -> %d tokens, %d mel frames",
            len(audio) / sr,
            tokens.shape[1],
            speech_feat.shape[1],
        )
        return PromptFeatures(embedding=embedding, speech_tokens=tokens, speech_feat=speech_feat, text=text)


WARMUP_PROMPT_TEXT = "Hello, this is a warm-up."


def warmup_prompt(seconds: float = 3.0, sample_rate: int = TOKENIZER_SAMPLE_RATE) -> PromptAudio:
    """A generated prompt recording for warm-up and health checks of a model without a built-in
    voice: a voiced-sounding harmonic signal (gliding pitch, syllable-rate envelope) with a
    transcript. It sounds like nobody; it only has to run every cloning path."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    f0 = 140.0 + 30.0 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    voiced = sum(np.sin(h * phase) / h for h in range(1, 9))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4.0 * t) ** 2
    audio = (0.15 * envelope * voiced).astype(np.float32)
    return PromptAudio(audio=audio, sample_rate=sample_rate, text=WARMUP_PROMPT_TEXT)
