"""CosyVoice v1 (`cosyvoice.yaml`): what a downloaded CosyVoice-300M-SFT directory holds::

    cosyvoice.yaml  llm.pt  flow.pt  hift.pt (legacy weight_g/weight_v names)  spk2info.pt
    campplus.onnx  speech_tokenizer_v1.onnx (small stand-ins with the official I/O)

The result loads with `load_model_directory` (strict) and synthesises noise-like audio.
"""

from __future__ import annotations

from pathlib import Path

from cosyserve.errors import ModelConfigError
from cosyserve.families.cosyvoice1.config import load_model_config
from cosyserve.families.cosyvoice1.loader import (
    REQUIRED_FILES,
    SPEECH_TOKENIZER_FILE,
    ZERO_SHOT_FILES,
    build_network,
)
from cosyserve.nn.hift import to_legacy_weight_norm_state_dict
from cosyserve.tools.make_model.common import (
    SFT_SPEAKERS,
    MakeModelOptions,
    WrittenFile,
    speaker_names,
    voice_the_f0_head,
    write_network,
    write_speakers,
)

WHISPER_FRAMES_PER_TOKEN = 2  # 100 Hz log-mel -> 50 Hz speech tokens


class CosyVoice1Writer:
    """Writes a v1 directory; the config is validated when the writer is made."""

    title = "CosyVoice v1"
    outputs = (*REQUIRED_FILES, *ZERO_SHOT_FILES)
    notes = (
        "The weights are random: this is NOT a trained model, its audio is noise-like. The ONNX files",
        "are small stand-ins with the official inputs/outputs, not CAM++ or the speech tokenizer.",
    )

    def __init__(self, config_path: Path, options: MakeModelOptions):
        self.config = load_model_config(config_path)
        self.options = options
        count = len(SFT_SPEAKERS) if options.speakers is None else options.speakers
        if count < 1:
            raise ModelConfigError(
                "a CosyVoice v1 directory needs at least one built-in speaker (spk2info.pt)"
            )
        self.speakers = speaker_names(count)

    def write(self, out: Path) -> list[WrittenFile]:
        from cosyserve.tools.onnx_standins import write_standins

        seed, config = self.options.seed, self.config
        written = [
            write_network("llm", lambda: build_network("llm", config), out, seed),
            write_network("flow", lambda: build_network("flow", config), out, seed),
            write_network("hift", self._build_hift, out, seed, to_legacy_weight_norm_state_dict),
            write_speakers(out, self.speakers, config.llm.spk_embed_dim, seed),
        ]
        paths = write_standins(
            out,
            seed=seed,
            embed_dim=config.llm.spk_embed_dim,
            vocab_size=config.llm.speech_token_size,
            tokenizer_file=SPEECH_TOKENIZER_FILE,
            frames_per_token=WHISPER_FRAMES_PER_TOKEN,
        )
        return written + [WrittenFile.of(out, p) for p in paths]

    def _build_hift(self):
        hift = build_network("hift", self.config)
        voice_the_f0_head(hift)
        return hift
