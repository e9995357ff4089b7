"""Property tests (hypothesis) for every parser of client or model-directory bytes: whatever it
is given, a parser returns a well-formed result or raises cosyserve's own typed error, never
anything else. Example counts are bounded so that the suite stays fast;
`COSYSERVE_PROPERTY_SCALE=10` multiplies them (a longer hunt)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cosyserve.errors import CosyserveError, InvalidRequestError, ModelConfigError

SCALE = int(os.environ.get("COSYSERVE_PROPERTY_SCALE", "1"))
BOUNDED = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}

# Any code point, lone surrogates and control characters included.
ANY_TEXT = st.text(alphabet=st.characters(exclude_categories=()), max_size=300)


# --------------------------------------------------------------------------------------------
# Request fields: JSON bodies and whatever arrives with any content type
# --------------------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | ANY_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_TEXT, inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300 * SCALE, **BOUNDED)
@given(st.one_of(st.binary(max_size=400), JSON_VALUES.map(lambda v: json.dumps(v).encode())))
def test_json_fields_parse_or_refuse(raw: bytes) -> None:
    from cosyserve.server.routers.common import parse_json_object

    try:
        fields = parse_json_object(raw)
    except InvalidRequestError:
        return
    assert isinstance(fields, dict)


@pytest.fixture(scope="module")
def http_client():
    from fastapi.testclient import TestClient

    from cosyserve.server.app import create_app
    from tests.server.conftest import make_settings
    from tests.server.fakes import FakeBackend

    app = create_app(make_settings(max_upload_mb=1.0, decode_workers=0), backend=FakeBackend(step_sleep_s=0))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


FIELD_NAMES = st.sampled_from(
    ["tts_text", "spk_id", "format", "speed", "stream", "seed", "max_text_length", "enable_smart_split",
     "prompt_text", "instruct_text", "input", "voice", "model", "response_format", "name", "transcript"]
)  # fmt: skip
FORM_VALUES = st.one_of(ANY_TEXT, st.sampled_from(["alice", "wav", "1.5", "true", ""]))


def _clean(text: str) -> str:
    # A form encoder needs encodable text: lone surrogates go in through JSON only.
    return text.encode("utf-8", "replace").decode("utf-8")


@settings(max_examples=150 * SCALE, **BOUNDED)
@given(
    path=st.sampled_from(
        [
            "/inference_sft",
            "/inference_zero_shot",
            "/inference_instruct",
            "/v1/audio/speech",
            "/v1/voices",
            "/v1/audio/voices",
        ]
    ),  # fmt: skip
    kind=st.sampled_from(["json", "form", "multipart", "raw"]),
    fields=st.dictionaries(FIELD_NAMES, FORM_VALUES, max_size=6),
    raw=st.binary(max_size=300),
    content_type=st.sampled_from(
        [
            "application/json",
            "text/plain",
            "application/xml",
            "multipart/form-data; boundary=x",
            "application/x-www-form-urlencoded",
            "",
            "application/json; charset=latin-1",
            "image/png",
        ]
    ),  # fmt: skip
)
def test_any_body_gets_a_4xx_or_a_2xx(http_client, path, kind, fields, raw, content_type) -> None:
    if kind == "json":
        response = http_client.post(
            path, content=json.dumps(fields).encode(), headers={"content-type": "application/json"}
        )
    elif kind == "form":
        response = http_client.post(path, data={k: _clean(v) for k, v in fields.items()})
    elif kind == "multipart":
        files = {
            "prompt_wav": ("x.wav", raw, "audio/wav"),
            "audio": ("a.bin", raw, content_type or "audio/wav"),
        }
        response = http_client.post(path, data={k: _clean(v) for k, v in fields.items()}, files=files)
    else:
        response = http_client.post(
            path, content=raw, headers={"content-type": content_type} if content_type else {}
        )
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert set(response.json()["error"]) >= {"code", "message"}


# --------------------------------------------------------------------------------------------
# Audio uploads: random containers, channel counts, rates, truncation, lying headers
# --------------------------------------------------------------------------------------------


def _wav(
    channels: int, rate: int, bits: int, fmt_tag: int, frames: int, lie: dict[str, int], seed: int
) -> bytes:
    width = bits // 8
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=frames * channels * width, dtype=np.uint8).tobytes()
    # A lie replaces one header field with any value of the field's width.
    declared = lie.get("channels", channels) & 0xFFFF
    block = lie.get("block_align", channels * width) & 0xFFFF
    byte_rate = lie.get("byte_rate", rate * channels * width) & 0xFFFFFFFF
    fmt = struct.pack("<HHIIHH", fmt_tag, declared, lie.get("rate", rate), byte_rate, block, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", lie.get("data_size", len(data)) & 0xFFFFFFFF) + data
    return b"RIFF" + struct.pack("<I", lie.get("riff_size", 4 + len(body)) & 0xFFFFFFFF) + body


LIES = st.dictionaries(
    st.sampled_from(["channels", "rate", "byte_rate", "block_align", "data_size", "riff_size"]),
    st.integers(0, 2**32 - 1),
    max_size=2,
)


@settings(max_examples=200 * SCALE, **BOUNDED)
@given(
    channels=st.integers(1, 32),
    rate=st.integers(1000, 384_000),
    bits=st.sampled_from([8, 16, 24, 32]),
    fmt_tag=st.sampled_from([1, 1, 3, 6, 7, 0xFFFE, 0]),
    frames=st.integers(0, 3000),
    lie=LIES,
    cut=st.one_of(st.none(), st.integers(0, 4000)),
    seed=st.integers(0, 2**16),
)
def test_wav_uploads_decode_or_refuse(channels, rate, bits, fmt_tag, frames, lie, cut, seed) -> None:
    from cosyserve.audio.io import decode_audio

    data = _wav(channels, rate, bits, fmt_tag, frames, lie, seed)
    if cut is not None:
        data = data[:cut]
    _check_decode(decode_audio, data)


def _check_decode(decode, data: bytes) -> None:
    try:
        audio, rate = decode(data, None, 30.0)
    except InvalidRequestError:
        return
    assert audio.dtype == np.float32 and audio.ndim == 1 and len(audio) > 0
    assert np.all(np.isfinite(audio)) and 8000 <= rate <= 384_000
    assert len(audio) <= 30.0 * rate


_ENCODED: dict[tuple[str, int, int], bytes] = {}


def _encoded(container: str, channels: int, rate: int) -> bytes:
    """A short recording made with PyAV (cached: encoding is the slow part)."""
    import av

    key = (container, channels, rate)
    if key not in _ENCODED:
        codec = {"flac": "flac", "ogg": "libopus", "mp3": "libmp3lame", "adts": "aac", "wav": "pcm_s16le"}[
            container
        ]
        layout = av.AudioLayout("mono" if channels == 1 else "stereo")
        buf = io.BytesIO()
        with av.open(buf, mode="w", format=container) as out:
            stream = out.add_stream(codec, rate=rate, layout=layout)
            t = np.arange(rate // 2) / rate
            tone = np.tile((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), (layout.nb_channels, 1))
            frame = av.AudioFrame.from_ndarray(tone.T.copy().reshape(1, -1), format="flt", layout=layout)
            frame.sample_rate = rate
            converter = av.AudioResampler(format=stream.format.name, layout=layout, rate=stream.rate)
            for part in converter.resample(frame):
                for packet in stream.encode(part):
                    out.mux(packet)
            for packet in stream.encode(None):
                out.mux(packet)
        _ENCODED[key] = buf.getvalue()
    return _ENCODED[key]


@settings(max_examples=150 * SCALE, **BOUNDED)
@given(
    container=st.sampled_from(["flac", "ogg", "mp3", "adts", "wav"]),
    channels=st.sampled_from([1, 2]),
    rate=st.sampled_from([16000, 48000]),
    edits=st.lists(st.tuples(st.integers(0, 20000), st.integers(0, 255)), max_size=8),
    cut=st.one_of(st.none(), st.integers(0, 20000)),
    junk=st.binary(max_size=64),
)
def test_encoded_uploads_decode_or_refuse(container, channels, rate, edits, cut, junk) -> None:
    from cosyserve.audio.io import decode_audio

    data = bytearray(_encoded(container, channels, rate))
    for position, value in edits:  # flipped bytes anywhere: corrupt headers, corrupt frames
        if data:
            data[position % len(data)] = value
    if cut is not None:
        data = data[:cut]
    _check_decode(decode_audio, bytes(data) + junk)


# --------------------------------------------------------------------------------------------
# Model yaml
# --------------------------------------------------------------------------------------------

YAML_ATOMS = st.sampled_from(
    ["a", "b", "llm", "flow", "hift", "1", "-2.5", "1e-06", "true", "null", "~", "'x'", '"y"', "[]", "{}",
     "!ref <a>", "!ref <b>", "!ref <a> * <b>", "!ref <a><b>", "!ref <llm.x>", "!ref <flow[0]>", "!ref <nope>",
     "!new:cosyvoice.llm.llm.TransformerLM", "!name:torch.nn.Linear", "!apply:os.system ['ls']",
     "!tuple (1, 2)", "!PLACEHOLDER", "!copy <a>", "&x 3", "*x", "!!python/object:os.system", "<<: *x", "!ref"]
)  # fmt: skip


@st.composite
def yaml_documents(draw) -> str:
    lines = []
    for _ in range(draw(st.integers(0, 12))):
        indent = "  " * draw(st.integers(0, 2))
        key = draw(st.sampled_from(["a", "b", "llm", "flow", "hift", "x", "- ", "c"]))
        value = draw(YAML_ATOMS)
        lines.append(f"{indent}{key}{'' if key == '- ' else ': '}{value}")
    if draw(st.booleans()):
        lines.append(draw(st.text(max_size=40)))
    return "\n".join(lines) + "\n"


@settings(max_examples=400 * SCALE, **BOUNDED)
@given(st.one_of(yaml_documents(), st.text(max_size=200)))
def test_yaml_reader_parses_or_refuses(text: str) -> None:
    from cosyserve.families.cosyvoice1.config import config_from_tree
    from cosyserve.nn.yaml_reader import parse_yaml_tree

    try:
        tree = parse_yaml_tree(text, "fuzz.yaml")
    except ModelConfigError as exc:
        assert "fuzz.yaml" in exc.message
        return
    assert isinstance(tree, dict)
    with contextlib.suppress(ModelConfigError):  # the only error a mapping may raise
        config_from_tree(tree, "fuzz.yaml")


# --------------------------------------------------------------------------------------------
# Text: any Unicode
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def frontend():
    from cosyserve.text.frontend import TextFrontend

    return TextFrontend()


@settings(max_examples=200 * SCALE, **BOUNDED)
@given(text=ANY_TEXT, limit=st.sampled_from([None, 10, 37, 100]), smart=st.booleans())
def test_text_frontend_segments_or_refuses(frontend, text, limit, smart) -> None:
    from cosyserve.text.sanitize import clean_text

    try:
        cleaned = clean_text(text)
    except InvalidRequestError:
        assert any("\ud800" <= c <= "\udfff" for c in text)
        return
    for run in (
        lambda: frontend.normalize(cleaned, max_text_length=limit, enable_smart_split=smart),
        lambda: list(frontend.iter_segments(cleaned, max_text_length=limit, enable_smart_split=smart)),
        lambda: frontend.normalize(cleaned, split=False),
    ):
        try:
            segments = run()
        except CosyserveError as exc:
            assert isinstance(exc, InvalidRequestError)
            continue
        assert segments and all(isinstance(s, str) for s in segments)
        for segment in segments:
            assert isinstance(frontend.tokenize(segment), list)
