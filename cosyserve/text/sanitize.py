"""Text as clients send it, made safe for every text pipeline behind the API.

JSON can carry a lone UTF-16 surrogate (``"\\ud800"``), which no UTF-8 library accepts (espeak
raised ``UnicodeEncodeError`` deep inside the embedded voice), and control characters such as
NUL, which C strings cannot hold (espeak: "embedded null character"). :func:`clean_text` refuses
the first with a 400 that says where it is, and turns the second into spaces (they carry no
speech; tab, newline and carriage return are kept, as the segmenter uses newlines).
"""

from __future__ import annotations

import re

from cosyserve.errors import InvalidRequestError

_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def clean_text(text: str, field: str = "text") -> str:
    """``text`` with control characters replaced by spaces; InvalidRequestError (naming
    ``field``) for a lone surrogate."""
    if not isinstance(text, str):
        raise InvalidRequestError(f"{field} must be a string, got {type(text).__name__}")
    surrogate = _SURROGATE.search(text)
    if surrogate is not None:
        raise InvalidRequestError(
            f"{field} is not valid Unicode: a lone surrogate U+{ord(surrogate.group()):04X} at "
            f"character {surrogate.start()} (send text encoded as UTF-8)"
        )
    return _CONTROL.sub(" ", text)
