"""cosyserve: a fast, lean inference server for CosyVoice text-to-speech models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Synthesizer", "AudioChunk", "SynthesisInfo", "PromptAudio", "__version__"]

if TYPE_CHECKING:
    from cosyserve.api import AudioChunk, PromptAudio, SynthesisInfo
    from cosyserve.synthesizer import Synthesizer


def __getattr__(name: str) -> Any:
    # Lazy: `import cosyserve` stays cheap (no torch) for the CLI's help and the server's settings.
    if name == "Synthesizer":
        from cosyserve.synthesizer import Synthesizer

        return Synthesizer
    if name in ("AudioChunk", "SynthesisInfo", "PromptAudio"):
        from cosyserve import api as types

        return getattr(types, name)
    raise AttributeError(name)
