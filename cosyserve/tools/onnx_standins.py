"""Small random ONNX stand-ins for the two front-end models of a CosyVoice model directory.

They have the inputs, outputs, dtypes and shapes of the official files, so the zero-shot code path
(fbank -> speaker embedding, whisper log-mel -> speech tokens) runs end to end on a generated
model directory; their values are meaningless.

* `campplus.onnx` (CAM++ speaker encoder): input `input` float32 `[B, T, 80]` (mean-normalised
  kaldi fbank) -> output float32 `[B, 192]`.
* `speech_tokenizer_v1.onnx`: inputs `feats` float32 `[1, 128, T]` (whisper log-mel, 100 frames/s)
  and `feats_length` int32 `[1]` -> output `indices` int32 `[1, ceil(T / 2)]`, ids in [0, 4096)
  (50 tokens/s, the rate of the v1 tokenizer).
* `speech_tokenizer_v2.onnx` / `speech_tokenizer_v3.onnx` (CosyVoice2 / CosyVoice3): fed the same
  way (upstream's frontend is shared), 25 tokens/s: `indices` `[1, ceil(T / 4)]`, ids in [0, 6561).

Upstream's frontend (`_extract_spk_embedding`, `_extract_speech_token`) feeds inputs by position
(`get_inputs()[i].name`) and reads output 0, so names matter less than order, shapes and dtypes.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

logger = logging.getLogger(__name__)

__all__ = ["campplus_model", "check_standins", "speech_tokenizer_model", "write_standins"]

_OPSET = 17
_IR_VERSION = 8  # readable by every onnxruntime >= 1.14

CAMPPLUS_INPUT = "input"
CAMPPLUS_OUTPUT = "output"
TOKENIZER_INPUTS = ("feats", "feats_length")
TOKENIZER_OUTPUT = "indices"


def _model(graph: onnx.GraphProto, doc: str) -> onnx.ModelProto:
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", _OPSET)], producer_name="cosyserve make-model"
    )
    model.ir_version = _IR_VERSION
    model.doc_string = doc
    onnx.checker.check_model(model)
    return model


def campplus_model(rng: np.random.Generator, fbank_dim: int = 80, embed_dim: int = 192) -> onnx.ModelProto:
    """Mean over time -> linear -> [B, embed_dim] (random weights)."""
    w = (rng.standard_normal((fbank_dim, embed_dim)) / np.sqrt(fbank_dim)).astype(np.float32)
    b = (0.1 * rng.standard_normal(embed_dim)).astype(np.float32)
    nodes = [
        helper.make_node("ReduceMean", [CAMPPLUS_INPUT], ["pooled"], axes=[1], keepdims=0),
        helper.make_node("MatMul", ["pooled", "w"], ["proj"]),
        helper.make_node("Add", ["proj", "b"], [CAMPPLUS_OUTPUT]),
    ]
    graph = helper.make_graph(
        nodes,
        "campplus_standin",
        [helper.make_tensor_value_info(CAMPPLUS_INPUT, TensorProto.FLOAT, ["B", "T", fbank_dim])],
        [helper.make_tensor_value_info(CAMPPLUS_OUTPUT, TensorProto.FLOAT, ["B", embed_dim])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    return _model(graph, "random stand-in for CAM++ campplus.onnx (NOT a trained model)")


def speech_tokenizer_model(
    rng: np.random.Generator,
    n_mels: int = 128,
    vocab_size: int = 4096,
    frames_per_token: int = 2,
    name: str = "speech_tokenizer_v1",
) -> onnx.ModelProto:
    """Crop to feats_length, project every frame onto `vocab_size` random directions, argmax,
    keep every `frames_per_token`-th frame (100 Hz -> 50 Hz for v1, 25 Hz for v2/v3) -> int32 ids."""
    w = rng.standard_normal((n_mels, vocab_size)).astype(np.float32)
    consts = {
        "zero": np.array([0], np.int64),
        "one": np.array([1], np.int64),
        "two": np.array([2], np.int64),  # the time axis of feats (and v1's step)
        "big": np.array([np.iinfo(np.int64).max], np.int64),
    }
    step = "two"
    if frames_per_token != 2:
        step = "step"
        consts[step] = np.array([frames_per_token], np.int64)
    nodes = [
        helper.make_node("Cast", [TOKENIZER_INPUTS[1]], ["len64"], to=TensorProto.INT64),
        helper.make_node("Slice", [TOKENIZER_INPUTS[0], "zero", "len64", "two"], ["cropped"]),  # [1, M, L]
        helper.make_node("Transpose", ["cropped"], ["frames"], perm=[0, 2, 1]),  # [1, L, M]
        helper.make_node("MatMul", ["frames", "w"], ["scores"]),  # [1, L, V]
        helper.make_node("ArgMax", ["scores"], ["ids64"], axis=2, keepdims=0),  # [1, L]
        helper.make_node("Slice", ["ids64", "zero", "big", "one", step], ["half"]),  # [1, ceil(L/step)]
        helper.make_node("Cast", ["half"], [TOKENIZER_OUTPUT], to=TensorProto.INT32),
    ]
    graph = helper.make_graph(
        nodes,
        f"{name}_standin",
        [
            helper.make_tensor_value_info(TOKENIZER_INPUTS[0], TensorProto.FLOAT, [1, n_mels, "T"]),
            helper.make_tensor_value_info(TOKENIZER_INPUTS[1], TensorProto.INT32, [1]),
        ],
        [helper.make_tensor_value_info(TOKENIZER_OUTPUT, TensorProto.INT32, [1, "N"])],
        initializer=[numpy_helper.from_array(w, "w")]
        + [numpy_helper.from_array(v, k) for k, v in consts.items()],
    )
    return _model(graph, f"random stand-in for {name}.onnx (NOT a trained model)")


def check_standins(
    campplus_path: str | os.PathLike[str],
    tokenizer_path: str | os.PathLike[str],
    embed_dim: int = 192,
    vocab_size: int = 4096,
    frames_per_token: int = 2,
) -> None:
    """Run both files once in onnxruntime and check the output shapes / dtypes / ranges."""
    import onnxruntime

    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads = 1
    cam = onnxruntime.InferenceSession(os.fspath(campplus_path), opts, providers=["CPUExecutionProvider"])
    emb = cam.run(None, {cam.get_inputs()[0].name: np.zeros((2, 37, 80), np.float32) + 0.5})[0]
    if emb.shape != (2, embed_dim) or emb.dtype != np.float32 or not np.isfinite(emb).all():
        raise RuntimeError(f"campplus stand-in gave {emb.shape} {emb.dtype}")
    tok = onnxruntime.InferenceSession(os.fspath(tokenizer_path), opts, providers=["CPUExecutionProvider"])
    frames = 101
    feats = np.random.default_rng(0).standard_normal((1, 128, frames)).astype(np.float32)
    names = [i.name for i in tok.get_inputs()]
    ids = tok.run(None, {names[0]: feats, names[1]: np.array([frames], np.int32)})[0]
    expected = (1, -(-frames // frames_per_token))
    if ids.shape != expected or ids.dtype != np.int32 or ids.min() < 0 or ids.max() >= vocab_size:
        raise RuntimeError(f"speech tokenizer stand-in gave {ids.shape} {ids.dtype}")


def write_standins(
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    embed_dim: int = 192,
    vocab_size: int = 4096,
    tokenizer_file: str = "speech_tokenizer_v1.onnx",
    frames_per_token: int = 2,
) -> tuple[str, str]:
    """Write `campplus.onnx` and the speech tokenizer (`tokenizer_file`) into `out_dir`, check them,
    return the paths."""
    rng = np.random.default_rng(seed)
    cam_path = os.path.join(out_dir, "campplus.onnx")
    tok_path = os.path.join(out_dir, tokenizer_file)
    name = tokenizer_file.removesuffix(".onnx")
    onnx.save(campplus_model(rng, embed_dim=embed_dim), cam_path)
    onnx.save(
        speech_tokenizer_model(rng, vocab_size=vocab_size, frames_per_token=frames_per_token, name=name),
        tok_path,
    )
    check_standins(cam_path, tok_path, embed_dim, vocab_size, frames_per_token)
    return cam_path, tok_path
