"""The decode worker: a small process that decodes client audio for the server.

Run as ``python -m cosyserve.audio.decode_worker MEMORY_MB`` by :mod:`cosyserve.audio.sandbox`,
never by hand. A codec library that crashes or runs wild on a hostile upload then takes down
only this process, which the sandbox replaces; the server answers that one request with a 400.

The worker caps its own address space (``MEMORY_MB``), dumps no core, and serves requests one at a time over its stdin/stdout pipes until stdin closes. Framing, both ways:
``<II`` (header length, payload length), a JSON header, the payload. Request header
``{"max_duration_s": float | null}`` with the encoded bytes as payload; reply header
``{"ok": true, "sample_rate": int}`` with float32 mono samples as payload, or
``{"ok": false, "message": str}`` (the reason the upload is refused) with an empty payload.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import struct
import sys
from typing import BinaryIO

FRAME = struct.Struct("<II")


def read_message(stream: BinaryIO) -> tuple[dict, bytes] | None:
    """One framed message, or None at a clean end of stream."""
    head = stream.read(FRAME.size)
    if not head:
        return None
    if len(head) != FRAME.size:
        raise EOFError("truncated frame header")
    header_len, payload_len = FRAME.unpack(head)
    header = stream.read(header_len)
    payload = stream.read(payload_len)
    if len(header) != header_len or len(payload) != payload_len:
        raise EOFError("truncated frame")
    return json.loads(header), payload


def write_message(stream: BinaryIO, header: dict, payload: bytes | memoryview = b"") -> None:
    encoded = json.dumps(header).encode()
    stream.write(FRAME.pack(len(encoded), len(payload)))
    stream.write(encoded)
    stream.write(payload)
    stream.flush()


def _limit_self(memory_mb: int) -> None:
    limits = [(resource.RLIMIT_CORE, 0)]
    if memory_mb > 0:
        limits.append((resource.RLIMIT_AS, memory_mb * 1024 * 1024))
    for which, value in limits:
        # A platform without the limit, or a lower hard limit already: keep what there is.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(which, (value, value))


def main(argv: list[str]) -> int:
    memory_mb = int(argv[1]) if len(argv) > 1 else 0
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the server; it closes us
    # The pipe is the protocol: move it off fd 1 so that nothing a library prints can corrupt it.
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    requests = sys.stdin.buffer
    _limit_self(memory_mb)

    import numpy as np

    from cosyserve.audio.io import decode_audio
    from cosyserve.errors import InvalidRequestError

    while True:
        message = read_message(requests)
        if message is None:
            return 0
        header, data = message
        try:
            audio, sample_rate = decode_audio(data, None, header.get("max_duration_s"))
        except InvalidRequestError as exc:
            write_message(channel, {"ok": False, "message": exc.message})
            continue
        except MemoryError:
            write_message(channel, {"ok": False, "message": "the audio is too large to decode"})
            continue
        except Exception as exc:  # noqa: BLE001 - whatever the upload triggers, it is refused
            write_message(
                channel, {"ok": False, "message": f"cannot decode the audio ({type(exc).__name__})"}
            )
            continue
        samples = np.ascontiguousarray(audio, dtype="<f4")
        write_message(channel, {"ok": True, "sample_rate": int(sample_rate)}, memoryview(samples).cast("B"))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
