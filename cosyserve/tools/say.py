"""`cosyserve say "text" --voice 中文女 --model DIR -o out.wav`: synthesise to a WAV file."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

from cosyserve.errors import CosyserveError

logger = logging.getLogger(__name__)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", help="text to speak ('-' reads standard input)")
    parser.add_argument("-o", "--output", default="out.wav", help="output WAV file (default out.wav)")
    parser.add_argument(
        "--model",
        "--model_dir",
        dest="model",
        default=None,
        help="CosyVoice model directory or hub id; unset = the embedded default voice",
    )
    parser.add_argument("--voice", default=None, help="speaker id (SFT or saved voice)")
    parser.add_argument("--prompt-wav", default=None, help="prompt recording for zero-shot / cross-lingual")
    parser.add_argument("--prompt-text", default=None, help="transcript of the prompt recording (zero-shot)")
    parser.add_argument("--instruct", default=None, help="instruction text (instruct mode)")
    parser.add_argument("--speed", type=float, default=1.0, help="speaking rate, 0.5-2.0")
    parser.add_argument("--stream", action="store_true", help="stream chunks as they are made")
    parser.add_argument("--seed", type=int, default=None, help="random seed for reproducible output")
    parser.add_argument("--max-text-length", type=int, default=None, help="longest text segment (characters)")
    parser.add_argument("--no-smart-split", action="store_true", help="disable smart splitting")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")


def _backend(args: argparse.Namespace):
    if args.model:
        from cosyserve.synthesizer import Synthesizer

        return Synthesizer(args.model, device=args.device).backend
    from cosyserve.families.piper.backend import EmbeddedBackend

    return EmbeddedBackend()


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from cosyserve.audio.encode import encode_all
    from cosyserve.synthesizer import Synthesizer

    text = sys.stdin.read() if args.text == "-" else args.text
    try:
        tts = Synthesizer(backend=_backend(args))
        voice = args.voice or tts.voices()[0].id
        chunks, info = tts.synthesize(
            text,
            voice=voice,
            prompt=args.prompt_wav,
            prompt_text=args.prompt_text,
            instruct=args.instruct,
            stream=args.stream,
            speed=args.speed,
            seed=args.seed,
            max_text_length=args.max_text_length,
            enable_smart_split=not args.no_smart_split,
        )
        parts: list[np.ndarray] = []
        t0 = time.perf_counter()
        with tqdm(desc="synthesising", unit="chunk", disable=None, file=sys.stderr) as bar:
            for chunk in chunks:
                parts.append(chunk.audio)
                bar.set_postfix(segment=chunk.segment + 1, audio_s=f"{info.audio_seconds:.1f}")
                bar.update(1)
        audio = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        Path(args.output).write_bytes(encode_all(audio, tts.sample_rate, "wav"))
    except CosyserveError as exc:
        print(f"cosyserve say: {exc.message}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - t0
    seconds = len(audio) / tts.sample_rate
    print(
        f"wrote {args.output}: {seconds:.2f} s of audio in {elapsed:.2f} s "
        f"(RTF {elapsed / max(seconds, 1e-9):.3f}, {len(info.segments) or 1} segment(s))",
        file=sys.stderr,
    )
    return 0
