"""Where a backend that reads text as it arrives (CosyVoice2/3 "bistream") plugs into a realtime session.

Every backend can take complete sentence (or clause) segments, one engine request each. A
backend that can consume the text of an utterance while it is still being written declares it
with a class-level capability flag (:attr:`cosyserve.interfaces.Backend.accepts_text_stream`), as
vLLM's model protocols do::

    class MyBackend(Backend):
        accepts_text_stream = True

        def open(self, request):
            if isinstance(request, TextStreamRequest):
                ...  # read request.text_stream between steps

and then gets one :class:`~cosyserve.api.TextStreamRequest` per utterance: its
:class:`~cosyserve.api.TextStream` is written on the event loop as pieces arrive and read by the
job on the engine thread. The job must not block waiting for text: ``TextStream.read`` returns
what is there (possibly nothing) and whether the stream is finished. A batched job that has
nothing to read says it is waiting (``BatchTask.waiting``): the engine parks it and sleeps when
every request waits, and the stream wakes it up when text arrives.

The request types live in :mod:`cosyserve.api` (the library takes text streams too); this module
keeps the realtime side's names.
"""

from __future__ import annotations

from typing import Any

from cosyserve.api import TextStream, TextStreamRequest

__all__ = ["TextStream", "TextStreamRequest", "supports_text_stream"]


def supports_text_stream(backend: Any) -> bool:
    """True when ``backend`` declares ``accepts_text_stream = True``."""
    return bool(getattr(backend, "accepts_text_stream", False))
