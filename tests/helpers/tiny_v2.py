"""A tiny CosyVoice2 model directory for tests, built from the parity set's random weights.

For the served-path parity tests: the parity set (official layout,
reduced dims) is the model: this copies it and adds what serving needs and the set leaves out:

* the Qwen2 tokenizer files (:mod:`cosyserve.tools.qwen_tokenizer_files`), and a text embedding
  with a row for every id they produce (a set's table is smaller, e.g. set A's 4096 rows: its LLM
  fixtures use random ids below that); the set's rows first, the rest small random values;
* a flow token embedding for every speech token the LLM can produce (the yaml's
  ``speech_token_size``; set A's flow has 4096 rows, its LLM 6561 speech tokens); again the set's
  rows first;
* ONNX stand-ins for ``campplus.onnx`` and ``speech_tokenizer_v2.onnx`` (25 tokens/s);
* no ``CosyVoice-BlankEN/model.safetensors`` (a served directory never reads it).

Both enlargements keep every number of the parity fixtures (their ids index the set's own rows).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from cosyserve.families.cosyvoice2.config import load_model_config
from cosyserve.tools.onnx_standins import write_standins
from cosyserve.tools.qwen_tokenizer_files import write_qwen_tokenizer_files
from tests.helpers.parity import parity_root

SET = "set_a"
TEXT_TABLE = "llm.model.model.embed_tokens.weight"
TEXT_HEAD = "llm.model.lm_head.weight"
FLOW_TABLE = "input_embedding.weight"


def parity_v2_dir() -> Path:
    return parity_root() / "cosyvoice2" / SET


def _grow(table: torch.Tensor, rows: int, generator: torch.Generator) -> torch.Tensor:
    if rows <= table.shape[0]:
        return table
    extra = 0.02 * torch.randn(rows - table.shape[0], table.shape[1], generator=generator)
    return torch.cat([table, extra.to(table.dtype)])


def make_tiny_v2_dir(out: Path, seed: int = 1234, source: Path | None = None) -> Path:
    """Write the tiny CosyVoice2 directory made from the parity set ``source`` (default: set A)
    into ``out`` (see the module doc); returns it."""
    source = source or parity_v2_dir()
    if not (source / "cosyvoice2.yaml").is_file():
        import pytest

        pytest.skip(f"no CosyVoice2 parity set at {source}")
    shutil.copytree(
        source,
        out,
        ignore=shutil.ignore_patterns("*.safetensors", "fixtures.npz", "frontend.json", "README.md"),
        copy_function=shutil.copyfile,  # the shared set is read-only; the copy is ours to change
    )
    for path in (out, *out.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    generator = torch.Generator().manual_seed(seed)
    backbone = out / "CosyVoice-BlankEN"
    write_qwen_tokenizer_files(backbone)
    vocab = json.loads((backbone / "vocab.json").read_text(encoding="utf-8"))
    config = json.loads((backbone / "tokenizer_config.json").read_text(encoding="utf-8"))
    # base ranks + base specials + the family specials upstream adds
    from cosyserve.text.qwen_tokenizer import COSYVOICE2_SPECIAL_TOKENS

    text_rows = len(vocab) + len(config["added_tokens_decoder"]) + len(COSYVOICE2_SPECIAL_TOKENS)

    llm = torch.load(out / "llm.pt", weights_only=True)
    llm[TEXT_TABLE] = _grow(llm[TEXT_TABLE], text_rows, generator)
    llm.pop(TEXT_HEAD, None)  # tied and unused: drop it rather than grow it
    torch.save(llm, out / "llm.pt")
    backbone_config = json.loads((backbone / "config.json").read_text(encoding="utf-8"))
    backbone_config["vocab_size"] = text_rows
    (backbone / "config.json").write_text(json.dumps(backbone_config, indent=2), encoding="utf-8")

    speech_tokens = load_model_config(out).llm.speech_token_size  # what the set's LLM can produce
    flow = torch.load(out / "flow.pt", weights_only=True)
    old_rows = flow[FLOW_TABLE].shape[0]
    flow[FLOW_TABLE] = _grow(flow[FLOW_TABLE], speech_tokens, generator)
    torch.save(flow, out / "flow.pt")
    yaml = (out / "cosyvoice2.yaml").read_text(encoding="utf-8")
    (out / "cosyvoice2.yaml").write_text(
        yaml.replace(f"vocab_size: {old_rows}", f"vocab_size: {max(old_rows, speech_tokens)}", 1),
        encoding="utf-8",
    )
    write_standins(
        out,
        seed=seed,
        vocab_size=speech_tokens,
        tokenizer_file="speech_tokenizer_v2.onnx",
        frames_per_token=4,
    )
    return out
