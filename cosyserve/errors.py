"""Typed errors. Each carries the HTTP status the server answers with, so user mistakes become
clear 4xx messages and never stack traces."""

from __future__ import annotations


class CosyserveError(Exception):
    """Base class of every error cosyserve raises on purpose."""

    status_code: int = 500
    code: str = "internal_error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidRequestError(CosyserveError):
    """Bad input: empty text, speed out of range, unreadable prompt audio, ..."""

    status_code = 400
    code = "invalid_request"


class UnknownVoiceError(InvalidRequestError):
    status_code = 404
    code = "unknown_voice"


class UnsupportedModeError(InvalidRequestError):
    """The loaded backend cannot do this (e.g. zero-shot on the embedded voice)."""

    status_code = 400
    code = "unsupported_mode"


class QueueFullError(CosyserveError):
    status_code = 429
    code = "queue_full"

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ModelDirectoryError(CosyserveError):
    """A model directory that is missing files, has broken checkpoints or the wrong family."""

    status_code = 500
    code = "model_directory_error"


class ModelConfigError(ModelDirectoryError):
    """`cosyvoice.yaml` cannot be read into a known architecture."""

    code = "model_config_error"


class DownloadError(CosyserveError):
    status_code = 503
    code = "download_error"


class AcceleratorUnavailableError(CosyserveError):
    """An optional accelerator (TensorRT, CUDA, ONNX Runtime, an int8 engine, ...) is not usable here."""

    status_code = 409
    code = "accelerator_unavailable"


class AccelerationMismatchError(AcceleratorUnavailableError):
    """An accelerated module does not reproduce the eager one (stale file, wrong weights, bug)."""


class CancelledError(CosyserveError):
    status_code = 499
    code = "cancelled"


class EngineStoppedError(CosyserveError):
    """The engine is shutting down (or stopped) and takes no new work."""

    status_code = 503
    code = "shutting_down"


class RequestTimeoutError(CosyserveError):
    status_code = 504
    code = "timeout"


class InsufficientStorageError(CosyserveError):
    """The disk under the voice store is full (ENOSPC, EDQUOT): nothing was written."""

    status_code = 507
    code = "insufficient_storage"


class StorageUnavailableError(CosyserveError):
    """The voice store cannot be written (read-only file system, permissions, I/O error)."""

    status_code = 503
    code = "storage_unavailable"


class DecoderUnavailableError(CosyserveError):
    """No audio decoder process can be started (the machine is out of processes or memory)."""

    status_code = 503
    code = "decoder_unavailable"


class SynthesisFailedError(CosyserveError):
    """An unexpected exception inside a backend job; only that request fails."""

    status_code = 500
    code = "synthesis_failed"
