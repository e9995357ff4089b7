"""The library API, in the spirit of faster-whisper::

    from cosyserve import Synthesizer

    tts = Synthesizer("CosyVoice-300M-SFT")          # a local directory or a hub id
    chunks, info = tts.synthesize("你好，世界。", voice="中文女", stream=True)
    for chunk in chunks:                               # float32 numpy at tts.sample_rate
        play(chunk.audio)
    print(info.rtf)

    tts2 = Synthesizer("CosyVoice2-0.5B")
    chunks, _ = tts2.synthesize(llm_answer_pieces(), voice="me", stream=True)  # text streamed in

The server and the CLI are users of this class; so is the benchmark.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from cosyserve.api import (
    AudioChunk,
    IteratorTextStream,
    PromptAudio,
    SynthesisInfo,
    SynthesisRequest,
    TextStreamRequest,
    VoiceInfo,
)
from cosyserve.engine.batching import run_alone
from cosyserve.errors import UnsupportedModeError
from cosyserve.hub import resolve_model_dir
from cosyserve.interfaces import Backend

PromptSource = PromptAudio | str | os.PathLike | bytes | tuple[np.ndarray, int]


def load_prompt(prompt: PromptSource, text: str | None = None) -> PromptAudio:
    """A prompt recording from a file path, encoded bytes, ``(audio, sample_rate)`` or a PromptAudio."""
    if isinstance(prompt, PromptAudio):
        if text is not None:
            prompt.text = text
        return prompt
    if isinstance(prompt, tuple):
        audio, sr = prompt
        return PromptAudio(np.asarray(audio, dtype=np.float32), int(sr), text)
    from cosyserve.audio.io import decode_audio

    audio, sr = decode_audio(prompt if isinstance(prompt, bytes) else Path(prompt))
    return PromptAudio(audio, sr, text)


class Synthesizer:
    """A CosyVoice model ready to speak.

    Args:
        model: a model directory, or a name / hub id (``CosyVoice-300M-SFT``,
            ``FunAudioLLM/CosyVoice-300M-SFT``, ``iic/CosyVoice-300M-SFT``) downloaded on first use.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda[:N]"``.
        fp16: run the LLM and flow in half precision (CUDA only).
        download_root: where hub downloads go; ``local_files_only`` never touches the network.
        voices_dir: where cloned voices are saved (default ``<model_dir>/voices``).
        stream_first_hop: speech tokens in the first streamed chunk (lower = earlier first audio).
        num_threads: torch CPU threads (0: torch's default).
    """

    def __init__(
        self,
        model: str | os.PathLike = "CosyVoice-300M-SFT",
        device: str = "auto",
        fp16: bool = False,
        download_root: str | os.PathLike | None = None,
        local_files_only: bool = False,
        voices_dir: str | os.PathLike | None = None,
        stream_first_hop: int | None = None,
        num_threads: int = 0,
        backend: Backend | None = None,
    ):
        if backend is None:
            model_dir = resolve_model_dir(
                str(model), cache_dir=download_root, local_files_only=local_files_only
            )
            from cosyserve.acceleration.launcher import open_family
            from cosyserve.families.base import FamilyOptions

            options = FamilyOptions(
                device=device,
                fp16=fp16,
                voices_dir=voices_dir,
                stream_first_hop=stream_first_hop,
                num_threads=num_threads or None,
            )
            backend = open_family(model_dir).open_backend(model_dir, options)
        self.backend = backend

    @property
    def sample_rate(self) -> int:
        return self.backend.sample_rate

    def voices(self) -> list[VoiceInfo]:
        return self.backend.voices()

    def save_voice(self, name: str, prompt: PromptSource, prompt_text: str | None = None) -> VoiceInfo:
        """Register a cloned voice once; use it later as ``voice=name`` (survives restarts)."""
        return self.backend.add_voice(name, load_prompt(prompt, prompt_text))

    def delete_voice(self, name: str) -> None:
        self.backend.delete_voice(name)

    def synthesize(
        self,
        text: str | Iterable[str],
        voice: str | None = None,
        prompt: PromptSource | None = None,
        prompt_text: str | None = None,
        instruct: str | None = None,
        stream: bool = False,
        speed: float = 1.0,
        seed: int | None = None,
        max_text_length: int | None = None,
        enable_smart_split: bool = True,
    ) -> tuple[Iterator[AudioChunk], SynthesisInfo]:
        """Start a synthesis; returns a lazy iterator of audio chunks and its (live) info record.

        The mode follows from the arguments: ``instruct`` → the model's instruct mode (CosyVoice v1:
        an SFT voice + instruction; CosyVoice2/3: instruct2, with ``prompt`` or ``voice``);
        ``prompt`` + ``prompt_text`` → zero-shot cloning; ``prompt`` alone → cross-lingual;
        otherwise the SFT or saved ``voice``. Bad input raises
        :class:`~cosyserve.errors.InvalidRequestError` (or a subclass) before any work starts.

        ``text`` may be an iterable of text pieces (an LLM's answer as it is written) on models
        that read text as it arrives (``accepts_text_stream``: CosyVoice2/3): the model takes each
        piece when it needs more text, and audio comes out before the text ends.
        """
        prompt_audio = load_prompt(prompt, prompt_text) if prompt is not None else None
        if instruct is not None:
            mode = "instruct" if "instruct" in self.backend.modes else "instruct2"
        elif prompt_audio is not None:
            mode = "zero_shot" if (prompt_audio.text or "").strip() else "cross_lingual"
        else:
            mode = "sft"
        options = {
            "voice": voice,
            "mode": mode,
            "prompt": prompt_audio,
            "instruct": instruct,
            "stream": stream,
            "speed": speed,
            "seed": seed,
            "max_text_length": max_text_length,
            "enable_smart_split": enable_smart_split,
        }
        if isinstance(text, str):
            request = SynthesisRequest(text=text, **options)  # type: ignore[arg-type]
        elif self.backend.accepts_text_stream:
            request = TextStreamRequest(text="", text_stream=IteratorTextStream(text), **options)  # type: ignore[arg-type]
        else:
            raise UnsupportedModeError(
                f"the loaded model ({self.backend.family or self.backend.name}) takes whole text only, "
                "not text streamed in pieces: pass a string"
            )
        job = self.backend.open(request)
        return (chunk for chunk in run_alone(job) if chunk is not None), job.info

    def synthesize_to_array(self, text: str, **kwargs) -> tuple[np.ndarray, SynthesisInfo]:
        """Convenience: the whole utterance as one float32 array."""
        chunks, info = self.synthesize(text, **kwargs)
        parts = [c.audio for c in chunks]
        return (np.concatenate(parts) if parts else np.zeros(0, np.float32)), info
