"""The one rule for saved-voice names, shared by the HTTP layer (checked before an upload is
read) and the store (which turns a name into a file name)."""

from __future__ import annotations

import re
import unicodedata

from cosyserve.errors import InvalidRequestError

MAX_NAME_LENGTH = 64
# Letters/digits/underscore of any script, then also '.' and '-'; the first character is a word
# character, so no hidden files, no '.', '..', no separators: nothing can leave the directory.
NAME_PATTERN = re.compile(r"\w[\w.\-]*")  # used with fullmatch (no "$": it allows a final newline)
# The same rule for the OpenAPI schema (ECMA-262 regex; its \w is ASCII-only, so the schema
# states the ASCII subset of what the server accepts).
NAME_SCHEMA_PATTERN = r"^\w([\w.\-]*[\w\-])?$"
NAME_RULE = (
    f"use 1-{MAX_NAME_LENGTH} letters or digits (any script), '_', '-' and '.', starting with a "
    "letter, digit or '_' and not ending with '.' (no spaces)"
)


def check_voice_name(name: object) -> str:
    """The canonical (NFC) form of a voice name, or InvalidRequestError saying the rule."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidRequestError("a voice name is required")
    canonical = unicodedata.normalize("NFC", name)
    if len(canonical) > MAX_NAME_LENGTH:
        raise InvalidRequestError(
            f"voice name is too long ({len(canonical)} characters; at most {MAX_NAME_LENGTH})"
        )
    if not NAME_PATTERN.fullmatch(canonical) or canonical.endswith("."):
        raise InvalidRequestError(f"invalid voice name {name!r}: {NAME_RULE}")
    return canonical
