"""Checkpoints: read a `torch.save`d state dict safely (memory-mapped, weights only), check it
against a network and load it without a second copy of the weights. Every problem becomes one
:class:`ModelDirectoryError` naming the file."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import pickle
import threading
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cosyserve.errors import ModelDirectoryError
from cosyserve.runtime.memory import page_out

logger = logging.getLogger(__name__)

_MAX_LISTED = 5

# ------------------------------------------------------------------------------------ reading


def _torch_load(path: Path, mmap: bool) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def checkpoint_error(path: Path, exc: BaseException) -> ModelDirectoryError:
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and "unsupported global" in text.lower():
        reason = (
            "holds Python objects other than tensors; refusing to unpickle them "
            "(only plain state dicts are loaded, torch.load(weights_only=True))"
        )
    elif isinstance(exc, (zipfile.BadZipFile, EOFError, pickle.UnpicklingError)) or any(
        s in text
        for s in (
            "central directory",
            "PytorchStreamReader",
            "Ran out of input",
            "truncated",
            "invalid load key",
        )
    ):
        reason = "not a readable PyTorch checkpoint (truncated or corrupt file?)"
    else:
        first = text.strip().splitlines()[0] if text.strip() else ""
        reason = f"cannot be read as a PyTorch checkpoint ({type(exc).__name__}: {first[:200]})"
    size = path.stat().st_size if path.exists() else 0
    return ModelDirectoryError(f"{path}: {reason} [{size} bytes]")


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """`torch.load(weights_only=True, mmap=True)` a flat state dict, with one clear error for any problem."""
    path = Path(path)
    try:
        try:
            obj = _torch_load(path, mmap=True)
        except RuntimeError as exc:
            # mmap needs the zip format; checkpoints in torch's legacy format load without it.
            if "mmap" not in str(exc) and "zipfile" not in str(exc):
                raise
            obj = _torch_load(path, mmap=False)
    except OSError as exc:
        if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise ModelDirectoryError(f"{path}: cannot open: {exc.strerror or exc}") from exc
        raise checkpoint_error(path, exc) from exc
    except Exception as exc:  # noqa: BLE001 - torch raises many types for broken files
        raise checkpoint_error(path, exc) from exc
    if not isinstance(obj, Mapping):
        raise ModelDirectoryError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        listed = ", ".join(repr(k) for k in bad[:_MAX_LISTED])
        raise ModelDirectoryError(
            f"{path}: expected a flat state dict (name -> tensor); {len(bad)} entries are not tensors "
            f"(e.g. {listed})"
        )
    return dict(obj)


def read_speakers(path: str | os.PathLike[str], embed_dim: int = 192) -> dict[str, torch.Tensor]:
    """`spk2info.pt` -> {speaker name: embedding FloatTensor[1, embed_dim]}."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise ModelDirectoryError(f"{path}: cannot open: {exc.strerror or exc}") from exc
    except Exception as exc:  # noqa: BLE001
        raise checkpoint_error(path, exc) from exc
    if not isinstance(obj, Mapping):
        raise ModelDirectoryError(
            f"{path}: expected {{speaker: {{'embedding': tensor[1, {embed_dim}]}}}}, got {type(obj).__name__}"
        )
    speakers: dict[str, torch.Tensor] = {}
    for name, info in obj.items():
        emb = info.get("embedding") if isinstance(info, Mapping) else None
        if not isinstance(emb, torch.Tensor):
            raise ModelDirectoryError(
                f"{path}: speaker {name!r} has no 'embedding' tensor "
                f"(expected {{speaker: {{'embedding': tensor[1, {embed_dim}]}}}})"
            )
        if emb.numel() != embed_dim or not emb.is_floating_point():
            raise ModelDirectoryError(
                f"{path}: speaker {name!r}: embedding has shape {list(emb.shape)} / {emb.dtype}, "
                f"expected a float tensor [1, {embed_dim}]"
            )
        speakers[str(name)] = emb.detach().reshape(1, embed_dim).to(torch.float32).clone()
    if not speakers:
        logger.warning("%s: no speakers; only zero-shot / instruct voices are available", path)
    return speakers


def check_state_dict(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    file: str | os.PathLike[str],
    note: str = "",
    config_name: str = "the model config",
) -> None:
    """Raise ONE ModelDirectoryError listing missing / unexpected keys and shape mismatches."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        (k, tuple(expected[k].shape), tuple(v.shape))
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or shapes):
        return

    def listing(keys: list[str]) -> str:
        more = f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
        return ", ".join(keys[:_MAX_LISTED]) + more

    problems = []
    if shapes:
        shown = "; ".join(f"{k}: expected {list(e)}, got {list(g)}" for k, e, g in shapes[:_MAX_LISTED])
        more = f"; ... ({len(shapes) - _MAX_LISTED} more)" if len(shapes) > _MAX_LISTED else ""
        problems.append(f"{len(shapes)} tensors have the wrong shape ({shown}{more})")
    if missing:
        problems.append(f"{len(missing)} missing keys ({listing(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({listing(unexpected)})")
    raise ModelDirectoryError(
        f"{file}: does not match the architecture in {config_name}{note}: " + "; ".join(problems)
    )


def load_into(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    file: Path,
    note: str = "",
    config_name: str = "the model config",
) -> None:
    """Strict load that *adopts* the checkpoint's tensors (``assign=True``) instead of copying them.

    With the checkpoint memory-mapped, parameters stay file-backed: loading needs no second copy of
    the weights (peak ~1x instead of ~2x) and pages never read (unused embedding rows) are never
    resident. Tensors whose dtype differs from the network's are converted first, so an FP16
    checkpoint still gives an FP32 network."""
    check_state_dict(module, state_dict, file, note, config_name)
    expected = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    adopted = {
        key: value
        if key not in expected or value.dtype == expected[key].dtype
        else value.to(expected[key].dtype)
        for key, value in state_dict.items()
    }
    try:
        module.load_state_dict(adopted, strict=True, assign=True)
    except RuntimeError as exc:  # e.g. a dtype that cannot be copied; shapes/keys were checked above
        raise ModelDirectoryError(f"{file}: cannot be loaded: {str(exc).strip().splitlines()[0]}") from exc
    # The converted originals (FP16 in the published CosyVoice2/3 checkpoints) were read once: their
    # file pages would stay in RSS as long as the file stays mapped (an FP16 text-embedding table
    # keeps llm.pt mapped), ~1.4 GB for CosyVoice3.
    for key, value in state_dict.items():
        if adopted[key] is not value:
            page_out(value)


def detach_from_checkpoint(module: nn.Module) -> None:
    """Give `module`'s remaining tensors their own memory, so the memory-mapped checkpoint they were
    adopted from is unmapped once nothing else uses it.

    Called after part of a network was released (e.g. the estimator, once ONNX Runtime serves it):
    pages of the released part that were read (for the export check) stay resident as long as the
    file stays mapped; copying the small remainder (~90 MB of flow) drops them from RSS."""
    with torch.no_grad():
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.device.type == "cpu":
                tensor.data = tensor.data.clone()
    # Released modules may linger in reference cycles, still holding the map: collect them now
    # rather than at some later, unknown point.
    gc.collect()


_RANDOM_INITS = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "xavier_uniform_",
    "xavier_normal_",
    "orthogonal_",
)
_init_lock = threading.Lock()


@contextlib.contextmanager
def skip_random_init() -> Iterator[None]:
    """Make torch.nn.init's random initialisers no-ops while networks are built for loading.

    Every parameter is overwritten by the strict load right after, and drawing ~436M random
    numbers costs ~10 s on two cores. Computed buffers (position tables, windows) do not use
    these functions, so they are unaffected.
    """
    with _init_lock:
        saved = {name: getattr(nn.init, name) for name in _RANDOM_INITS if hasattr(nn.init, name)}
        try:
            for name in saved:
                setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
            yield
        finally:
            for name, fn in saved.items():
                setattr(nn.init, name, fn)
