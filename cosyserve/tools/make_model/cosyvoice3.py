"""CosyVoice3 (`cosyvoice3.yaml`): the layout of the published Fun-CosyVoice3-0.5B-2512 directory::

    cosyvoice3.yaml  llm.pt (CosyVoice3LM)  flow.pt (DiT flow)  hift.pt (CausalHiFT, legacy weight_g/weight_v)
    campplus.onnx  speech_tokenizer_v3.onnx (small stand-ins with the official I/O)
    flow.decoder.estimator.fp32.onnx (the DiT, official input/output names)
    CosyVoice-BlankEN/  config.json  generation_config.json  vocab.json  merges.txt  tokenizer_config.json

No ``spk2info.pt`` by default: the official directory has no built-in speakers. The tokenizer
files are the base vocabulary; CosyVoice3's 278 added specials are added by the tokenizer at load.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from cosyserve.families.cosyvoice2.llm import Qwen2LMConfig
from cosyserve.families.cosyvoice3.llm import CosyVoice3LM, cosyvoice3_llm_config
from cosyserve.nn.qwen2 import Qwen2Config
from cosyserve.tools.make_model.cosyvoice2 import CosyVoice2Writer


class CosyVoice3Writer(CosyVoice2Writer):
    family = "cosyvoice3"
    title = "CosyVoice3"
    default_speakers = 0
    lm_class = CosyVoice3LM

    def _audio_config(self, tree: dict[str, Any], source: str) -> Any:
        from cosyserve.families.cosyvoice3.config import config_from_tree

        return config_from_tree(tree, source)

    def _llm_config(self, tree: dict[str, Any], backbone: Qwen2Config, source: str) -> Qwen2LMConfig:
        return cosyvoice3_llm_config(tree, backbone, source)

    @property
    def token_frame_rate(self) -> int:
        return int(self.config.token_frame_rate)

    def _build_flow(self) -> nn.Module:
        from cosyserve.families.cosyvoice3.flow import CausalMaskedDiffWithDiT

        return CausalMaskedDiffWithDiT(self.config.flow)

    def _build_hift(self) -> nn.Module:
        from cosyserve.families.cosyvoice3.hift import CausalHiFTGenerator

        return CausalHiFTGenerator(self.config.hift)

    def _hift_checkpoint(self, hift: nn.Module) -> Mapping[str, Tensor]:
        from cosyserve.families.cosyvoice3.hift import to_legacy_state_dict

        return to_legacy_state_dict(hift)  # type: ignore[arg-type]
