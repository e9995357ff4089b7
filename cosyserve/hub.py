"""Find or download a model directory: the one place that talks to model hubs.

`resolve_model_dir("CosyVoice-300M-SFT")` maps a short name (or a hub id) to Hugging Face
`FunAudioLLM/CosyVoice-300M-SFT` or ModelScope `iic/CosyVoice-300M-SFT` and returns the local
snapshot; a local directory is returned as is, without touching the network.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cosyserve.errors import DownloadError, ModelDirectoryError

logger = logging.getLogger(__name__)

__all__ = ["DOWNLOAD_PATTERNS", "KNOWN_MODELS", "hub_ids", "resolve_model_dir"]

HF_ORG = "FunAudioLLM"
MS_ORG = "iic"

# Short name -> (Hugging Face id, ModelScope id).
KNOWN_MODELS: dict[str, tuple[str, str]] = {
    "CosyVoice-300M-SFT": (f"{HF_ORG}/CosyVoice-300M-SFT", f"{MS_ORG}/CosyVoice-300M-SFT"),
    "CosyVoice-300M": (f"{HF_ORG}/CosyVoice-300M", f"{MS_ORG}/CosyVoice-300M"),
    "CosyVoice-300M-Instruct": (f"{HF_ORG}/CosyVoice-300M-Instruct", f"{MS_ORG}/CosyVoice-300M-Instruct"),
    "CosyVoice-300M-25Hz": (f"{HF_ORG}/CosyVoice-300M-25Hz", f"{MS_ORG}/CosyVoice-300M-25Hz"),
    "CosyVoice2-0.5B": (f"{HF_ORG}/CosyVoice2-0.5B", f"{MS_ORG}/CosyVoice2-0.5B"),
    "Fun-CosyVoice3-0.5B-2512": (f"{HF_ORG}/Fun-CosyVoice3-0.5B-2512", f"{HF_ORG}/Fun-CosyVoice3-0.5B-2512"),
}

# What inference reads; the repos also hold JIT/TensorRT exports we do not use (~GBs), and the
# CosyVoice2/3 `CosyVoice-BlankEN/model.safetensors` (~1 GB) that `llm.pt` supersedes: only the
# backbone's config and tokenizer files are fetched from that folder.
DOWNLOAD_PATTERNS: list[str] = [
    "*.yaml",
    "llm.pt",
    "flow.pt",
    "hift.pt",
    "spk2info.pt",
    "campplus.onnx",
    "speech_tokenizer_v*.onnx",
    "flow.decoder.estimator.fp32.onnx",
    "CosyVoice-BlankEN/*.json",
    "CosyVoice-BlankEN/merges.txt",
    "configuration.json",
    "README.md",
]

SOURCES = ("auto", "huggingface", "modelscope")
_SOURCE_ALIASES = {"hf": "huggingface", "hugging_face": "huggingface", "ms": "modelscope"}

_LOCAL_HINT = (
    "To run without network, download the model directory elsewhere (e.g. `hf download "
    "FunAudioLLM/CosyVoice-300M-SFT --local-dir CosyVoice-300M-SFT`) and pass its path instead of "
    "the name (a directory with its family's yaml, e.g. cosyvoice.yaml or cosyvoice2.yaml, and llm.pt, "
    "flow.pt, hift.pt)."
)


def _looks_like_path(text: str) -> bool:
    if text.startswith(("/", "./", "../", "~", ".\\", "..\\")) or os.sep != "/" and os.sep in text:
        return True
    return text.count("/") > 1 or text in (".", "..")


def hub_ids(name: str) -> tuple[str | None, str | None]:
    """(Hugging Face id, ModelScope id) for a short name or hub id; None where there is none.

    Raises DownloadError for a short name that is not a known model.
    """
    if "/" not in name:
        for short, ids in KNOWN_MODELS.items():
            if short.lower() == name.lower():
                return ids
        known = ", ".join(KNOWN_MODELS)
        raise DownloadError(
            f"unknown model name {name!r} (known: {known}); pass a hub id like "
            f"{HF_ORG}/CosyVoice-300M-SFT or a local model directory"
        )
    org, _, repo = name.partition("/")
    counterpart = next((ids for short, ids in KNOWN_MODELS.items() if short.lower() == repo.lower()), None)
    if org.lower() == HF_ORG.lower():
        return name, counterpart[1] if counterpart else None
    if org.lower() == MS_ORG.lower():
        return counterpart[0] if counterpart else None, name
    return name, name  # someone's own repo: try it under the same id on either hub


def _hf_download(repo_id: str, cache_dir: str | None, local_files_only: bool, revision: str | None) -> str:
    from huggingface_hub import snapshot_download  # looked up at call time: tests patch it

    return snapshot_download(
        repo_id,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        allow_patterns=DOWNLOAD_PATTERNS,
        revision=revision,
    )


def _modelscope_snapshot_download() -> Callable[..., str] | None:
    try:
        from modelscope import snapshot_download  # optional extra: `pip install cosyserve[modelscope]`
    except ImportError:
        return None
    return snapshot_download


def _ms_download(repo_id: str, cache_dir: str | None, local_files_only: bool, revision: str | None) -> str:
    download = _modelscope_snapshot_download()
    if download is None:
        raise ImportError("the optional `modelscope` package is not installed")
    kwargs: dict[str, Any] = {"cache_dir": cache_dir, "local_files_only": local_files_only}
    if revision:
        kwargs["revision"] = revision
    try:
        return download(repo_id, allow_patterns=DOWNLOAD_PATTERNS, **kwargs)
    except TypeError:  # older modelscope without allow_patterns: fetch everything
        return download(repo_id, **kwargs)


def _describe(exc: BaseException, local_files_only: bool) -> str:
    """One short reason for a failed download."""
    name = type(exc).__name__
    if isinstance(exc, ImportError):
        return str(exc)
    if name == "LocalEntryNotFoundError" or (local_files_only and isinstance(exc, FileNotFoundError)):
        if local_files_only:
            return "not in the local cache (local_files_only=True)"
        return "not in the local cache, and the hub cannot be reached (no network, or HF_HUB_OFFLINE=1)"
    if name in ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"):
        return f"repository or revision not found, or access denied ({name})"
    text = f"{name}: {exc}".lower()
    if isinstance(exc, (ConnectionError, TimeoutError)) or any(
        s in text for s in ("connect", "timed out", "timeout", "name resolution", "network", "offline")
    ):
        return f"no network connection ({name})"
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{name}: {first_line}"[:300]


def resolve_model_dir(
    name_or_path: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    source: str = "auto",
    revision: str | None = None,
) -> Path:
    """A local model directory for `name_or_path`, downloading it if needed.

    * an existing directory is returned as is (no network);
    * a short name (`CosyVoice-300M-SFT`, ...) or hub id (`FunAudioLLM/...`, `iic/...`) is fetched
      with `huggingface_hub.snapshot_download` (source "huggingface") or ModelScope's (source
      "modelscope", needs the optional `modelscope` package); "auto" tries Hugging Face first,
      then ModelScope. Only the files inference needs are downloaded. `local_files_only` uses
      the hub caches and never the network.

    Raises ModelDirectoryError for a local path that does not exist, DownloadError when no
    source could provide the model (the message says why and how to pass a local directory).
    """
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise ModelDirectoryError(f"{path}: is a file; expected a model directory (with cosyvoice*.yaml)")
    if not text.strip():
        raise ModelDirectoryError("no model given: pass a model directory or a name like CosyVoice-300M-SFT")
    if _looks_like_path(text):
        raise ModelDirectoryError(f"{path}: model directory not found")

    src = _SOURCE_ALIASES.get(source.lower(), source.lower())
    if src not in SOURCES:
        raise DownloadError(f"unknown download source {source!r} (choose from {', '.join(SOURCES)})")
    hf_id, ms_id = hub_ids(text)
    attempts: list[tuple[str, str, Callable[[str, str | None, bool, str | None], str]]] = []
    if src in ("auto", "huggingface") and hf_id:
        attempts.append(("Hugging Face", hf_id, _hf_download))
    if src in ("auto", "modelscope") and ms_id:
        attempts.append(("ModelScope", ms_id, _ms_download))
    if not attempts:
        raise DownloadError(f"{text!r} has no {src} repository id; try source='auto'")

    cache = os.fspath(cache_dir) if cache_dir is not None else None
    failures: list[str] = []
    for hub, repo_id, download in attempts:
        logger.info("fetching %s from %s%s", repo_id, hub, " (local cache only)" if local_files_only else "")
        try:
            local = Path(download(repo_id, cache, local_files_only, revision))
        except Exception as exc:  # noqa: BLE001 - every hub failure becomes one DownloadError below
            reason = _describe(exc, local_files_only)
            logger.debug("%s %s failed", hub, repo_id, exc_info=True)
            failures.append(f"{hub} {repo_id}: {reason}")
            continue
        logger.info("model %s is at %s", text, local)
        return local
    raise DownloadError(f"cannot get model {text!r}: " + "; ".join(failures) + ". " + _LOCAL_HINT)
