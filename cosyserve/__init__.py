"""cosyserve: a fast, lean inference server for CosyVoice text-to-speech models."""

__version__ = "0.1.0"
