"""Saved (cloned) voices on disk.

A voice is registered once: its prompt recording is encoded (speaker embedding, prompt speech
tokens, prompt mel features) and stored with its transcript, so later requests skip the ONNX
models and the upload entirely (upstream's ``add_zero_shot_spk`` + ``save_spkinfo``, but one file
per voice instead of rewriting one pickle of all voices).

Layout: ``<root>/<name>.voice.npz``, a plain ``numpy.savez`` archive (no pickle: loaded with
``allow_pickle=False``) holding ``embedding`` [1,192] float32, ``speech_tokens`` [1,N] int64,
``speech_feat`` [1,T,80] float32 and ``meta``, a JSON string (name, transcript, created-at,
source info, format version, and the model family the features belong to: a voice's speech tokens
and mel only mean something to the family that made them, so a store serves only its own
family's voices; files written before the tag existed are CosyVoice v1 voices). Each save writes a temporary file in the same directory, fsyncs
it and renames it over the target, so a crash at any point leaves either the old voice or the new
one, never a partial file. Stale temporary files are removed when a store is opened.

Several processes may share one directory (server replicas on one machine, or pods mounting one
network volume): nothing is held in memory that the directory does not confirm. Every lookup
checks the file, and the cache is keyed by (inode, mtime, size), so a voice saved, replaced or
deleted by another process is seen at the next request. A new voice is linked into place (never
renamed over an existing file) under a lock file, so two processes saving one name at once leave
exactly one complete voice and the other gets :class:`VoiceExistsError`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import tempfile
import threading
import time
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cosyserve.api import VoiceInfo
from cosyserve.errors import (
    CosyserveError,
    InsufficientStorageError,
    InvalidRequestError,
    StorageUnavailableError,
    UnknownVoiceError,
)
from cosyserve.voices.names import NAME_PATTERN, check_voice_name
from cosyserve.voices.prompt import PromptFeatures

logger = logging.getLogger(__name__)

VOICE_SUFFIX = ".voice.npz"
FORMAT_VERSION = 1
_NAME_RE = NAME_PATTERN
LEGACY_FAMILY = "cosyvoice1"  # voices saved before the family tag: only v1 was served then
# The disk is full: 507 (Insufficient Storage). Any other write failure (read-only file system,
# permissions, I/O error) makes the store unavailable: 503.
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_STALE_TMP_SECONDS = 3600.0
_TMP_PREFIX = ".tmp-"
_LOCK_NAME = ".lock"
# Saves hold the lock for one small write; waiting longer than this means a stuck writer.
_LOCK_TIMEOUT_S = 30.0

try:  # POSIX; elsewhere saves rely on the exclusive link alone
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class VoiceStoreError(CosyserveError):
    """A stored voice file that cannot be read (disk corruption, foreign file)."""

    status_code = 500
    code = "voice_store_error"


class VoiceFamilyError(InvalidRequestError):
    """A saved voice made by a model of another family (its tokens and mel mean nothing here)."""

    status_code = 409
    code = "incompatible_voice"


class VoiceExistsError(InvalidRequestError):
    """A voice of that name exists already (perhaps saved a moment ago by another replica)."""

    status_code = 409
    code = "conflict"


@dataclass
class SavedVoice:
    name: str
    features: PromptFeatures  # CPU tensors, shared with the store's cache: do not modify in place
    created_at: float  # unix time
    source: dict[str, Any] = field(default_factory=dict)
    family: str = LEGACY_FAMILY  # the model family whose prompt features these are

    @property
    def text(self) -> str | None:
        return self.features.text

    def info(self) -> VoiceInfo:
        return VoiceInfo(id=self.name, kind="saved", description=_describe(self.features.text, self.source))


def _describe(text: str | None, source: dict[str, Any]) -> str:
    parts = ["cloned voice"]
    duration = source.get("duration_s")
    if isinstance(duration, (int, float)):
        parts.append(f"{duration:.1f} s prompt")
    if text:
        parts.append(f"transcript: {text[:80]}")
    return ", ".join(parts)


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; not possible (nor needed) on every platform.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class VoiceStore:
    """Saved voices under ``root``; a new store over the same directory sees them all.

    ``reserved_names``: built-in speaker ids (e.g. the SFT speakers) that saved voices must not
    shadow. ``family``: the model family whose voices this store saves and serves; a voice of
    another family is not listed and is refused by :meth:`get` (:class:`VoiceFamilyError`). Safe to
    use from several threads of one process.
    """

    def __init__(self, root: str | Path, reserved_names: Iterable[str] = (), family: str = LEGACY_FAMILY):
        self.root = Path(root)
        self.family = family
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # e.g. a model directory mounted read-only: serve, refuse saves
            logger.warning("voice store %s cannot be created (%s): saving voices will fail", self.root, exc)
        self._reserved = {n.casefold() for n in reserved_names}
        self._lock = threading.RLock()
        self._cache: dict[str, tuple[tuple[int, int, int], SavedVoice]] = {}
        self._warned_no_links = False
        self._remove_stale_temporaries()

    # ---------------------------------------------------------------- names

    def set_reserved_names(self, names: Iterable[str]) -> None:
        self._reserved = {n.casefold() for n in names}

    def validate_name(self, name: str) -> str:
        """Return the canonical (NFC) form of a new voice name or raise InvalidRequestError."""
        canonical = check_voice_name(name)
        if canonical.casefold() in self._reserved:
            raise InvalidRequestError(f"voice name {canonical!r} is taken by a built-in speaker")
        return canonical

    def _path(self, name: str) -> Path:
        return self.root / f"{name}{VOICE_SUFFIX}"

    def _lookup_name(self, name: str) -> str:
        """Map a requested name to a stored one; UnknownVoiceError if there is none."""
        if isinstance(name, str):
            canonical = unicodedata.normalize("NFC", name)
            if _NAME_RE.fullmatch(canonical) and self._path(canonical).is_file():
                return canonical
        raise UnknownVoiceError(f"no saved voice named {name!r}")

    # ---------------------------------------------------------------- queries

    def names(self) -> list[str]:
        names = sorted(
            p.name[: -len(VOICE_SUFFIX)]
            for p in self.root.glob(f"*{VOICE_SUFFIX}")
            if not p.name.startswith(".") and p.is_file()
        )
        with self._lock:  # voices deleted by another process: drop their cached tensors
            for gone in self._cache.keys() - set(names):
                del self._cache[gone]
        return names

    def __contains__(self, name: object) -> bool:
        try:
            self._lookup_name(name)  # type: ignore[arg-type]
        except UnknownVoiceError:
            return False
        return True

    def __len__(self) -> int:
        return len(self.names())

    def list(self) -> list[VoiceInfo]:
        """Every readable saved voice of this store's family (unreadable files are logged and
        skipped; other families' voices are left out)."""
        infos = []
        for name in self.names():
            try:
                infos.append(self.get(name).info())
            except VoiceFamilyError:
                continue
            except (VoiceStoreError, UnknownVoiceError) as exc:  # deleted meanwhile or corrupt
                logger.warning("skipping saved voice %r: %s", name, exc.message)
        return infos

    def get(self, name: str) -> SavedVoice:
        """The saved voice ``name`` (cached; reloaded if the file changed on disk);
        :class:`VoiceFamilyError` when another family's model made it."""
        voice = self._get(name)
        if voice.family != self.family:
            raise VoiceFamilyError(
                f"saved voice {voice.name!r} was made with a {voice.family} model; this server's model is "
                f"{self.family}, which cannot use it: save the voice again from its recording (under "
                "another name, or after deleting this one with the server that made it)"
            )
        return voice

    def _get(self, name: str) -> SavedVoice:
        canonical = self._lookup_name(name)
        path = self._path(canonical)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise UnknownVoiceError(f"no saved voice named {name!r}") from None
        # every save is a new file (rename), so the inode changes even within one mtime tick
        signature = (st.st_ino, st.st_mtime_ns, st.st_size)
        with self._lock:
            cached = self._cache.get(canonical)
            if cached is not None and cached[0] == signature:
                return cached[1]
        voice = self._load(canonical, path)
        with self._lock:
            self._cache[canonical] = (signature, voice)
        return voice

    def _load(self, name: str, path: Path) -> SavedVoice:
        try:
            with np.load(path, allow_pickle=False) as npz:
                meta = json.loads(str(npz["meta"][()]))
                embedding = torch.from_numpy(np.array(npz["embedding"], dtype=np.float32))
                tokens = torch.from_numpy(np.array(npz["speech_tokens"], dtype=np.int64))
                feat = torch.from_numpy(np.array(npz["speech_feat"], dtype=np.float32))
            if meta.get("format") != FORMAT_VERSION:
                raise ValueError(f"unknown format version {meta.get('format')!r}")
            features = PromptFeatures(
                embedding=embedding, speech_tokens=tokens, speech_feat=feat, text=meta.get("text")
            )
        except FileNotFoundError:
            raise UnknownVoiceError(f"no saved voice named {name!r}") from None
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
            raise VoiceStoreError(f"saved voice {name!r} ({path}) is unreadable: {exc}") from exc
        return SavedVoice(
            name=name,
            features=features,
            created_at=float(meta.get("created_at", 0.0)),
            source=meta.get("source") or {},
            family=str(meta.get("family") or LEGACY_FAMILY),
        )

    # ---------------------------------------------------------------- changes

    def save(
        self,
        name: str,
        features: PromptFeatures,
        source: dict[str, Any] | None = None,
        overwrite: bool = False,
    ) -> SavedVoice:
        """Store ``features`` under ``name`` atomically. An existing voice of that name is a
        :class:`VoiceExistsError` unless ``overwrite``; names are compared case-insensitively so
        that stores on case-insensitive file systems stay unambiguous. Safe against other
        processes saving into the same directory at the same time."""
        name = self.validate_name(name)
        created_at = time.time()
        meta = {
            "format": FORMAT_VERSION,
            "name": name,
            "family": self.family,
            "text": features.text,
            "created_at": created_at,
            "source": dict(source or {}),
            "embedding_dim": int(features.embedding.shape[1]),
            "num_tokens": int(features.speech_tokens.shape[1]),
            "num_frames": int(features.speech_feat.shape[1]),
        }
        arrays = {
            "embedding": features.embedding.detach().to("cpu", torch.float32).numpy(),
            "speech_tokens": features.speech_tokens.detach().to("cpu", torch.int64).numpy(),
            "speech_feat": features.speech_feat.detach().to("cpu", torch.float32).numpy(),
            # A unicode scalar array: stored and loaded without pickle.
            "meta": np.array(json.dumps(meta, ensure_ascii=False, default=str)),
        }
        with self._lock, self._directory_lock():
            folded = name.casefold()
            for existing in self.names():
                if existing.casefold() == folded and (existing != name or not overwrite):
                    raise self._exists(existing, name)
            try:
                self._write_atomic(self._path(name), arrays, replace=overwrite, name=name)
            except OSError as exc:
                raise self._storage_error(f"cannot save voice {name!r}", exc) from exc
            self._cache.pop(name, None)
        logger.info("saved voice %r (%d prompt tokens)", name, meta["num_tokens"])
        return self.get(name)

    @staticmethod
    def _exists(existing: str, name: str) -> VoiceExistsError:
        return VoiceExistsError(
            f"a saved voice named {existing!r} already exists"
            + ("" if existing != name else "; delete it first or overwrite it")
        )

    def _storage_error(self, what: str, exc: OSError) -> CosyserveError:
        """The typed error for a failed write; the store is unchanged (see ``_write_atomic``)."""
        reason = exc.strerror or type(exc).__name__
        logger.error("%s: %s (voice store %s)", what, reason, self.root)
        if exc.errno in _NO_SPACE:
            return InsufficientStorageError(f"{what}: the disk holding saved voices is full ({reason})")
        return StorageUnavailableError(f"{what}: the voice store cannot be written ({reason})")

    def _write_atomic(
        self, path: Path, arrays: dict[str, np.ndarray], *, replace: bool = True, name: str = ""
    ) -> None:
        fd, tmp_name = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".npz", dir=self.root)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as f:
                self._write_payload(f, arrays)
                f.flush()
                os.fsync(f.fileno())
            if replace or not self._link_new(tmp, path, name):
                os.replace(tmp, path)  # atomic on POSIX and Windows
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        _fsync_dir(self.root)

    def _link_new(self, tmp: Path, path: Path, name: str) -> bool:
        """Put the complete file at ``path`` only if nothing is there: a hard link fails when the
        name exists, even if another process created it after our check (the lock file may be
        advisory only, e.g. on some network file systems). False: links are not supported here
        and the caller renames instead (protected by the lock alone)."""
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise self._exists(name, name) from None
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                if not self._warned_no_links:
                    self._warned_no_links = True
                    logger.warning("%s has no hard links; new voices are renamed into place", self.root)
                return False
            raise
        return True

    @contextlib.contextmanager
    def _directory_lock(self) -> Iterator[None]:
        """An exclusive lock on ``<root>/.lock`` shared by every process using this directory
        (flock; NFS clients map it to a byte-range lock). Where locks are unsupported, saves
        still cannot clobber each other's new voices (see :meth:`_link_new`)."""
        if fcntl is None:
            yield
            return
        fd = os.open(self.root / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            locked = self._acquire(fd)
            try:
                yield
            finally:
                if locked:
                    fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _acquire(self, fd: int) -> bool:
        deadline = time.monotonic() + _LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise VoiceStoreError(
                        f"the voice store {self.root} stayed locked for {_LOCK_TIMEOUT_S:.0f} s by another "
                        "process; try again"
                    ) from None
                time.sleep(0.01)
            except OSError as exc:  # ENOLCK and friends: a file system without locks
                logger.warning("cannot lock %s (%s); saving without the lock", self.root, exc)
                return False

    @staticmethod
    def _write_payload(f, arrays: dict[str, np.ndarray]) -> None:
        np.savez(f, **arrays)

    def delete(self, name: str) -> None:
        canonical = self._lookup_name(name)
        with self._lock:
            try:
                self._path(canonical).unlink()
            except FileNotFoundError:
                raise UnknownVoiceError(f"no saved voice named {name!r}") from None
            except OSError as exc:
                raise self._storage_error(f"cannot delete voice {canonical!r}", exc) from exc
            self._cache.pop(canonical, None)
        _fsync_dir(self.root)
        logger.info("deleted saved voice %r", canonical)

    def _remove_stale_temporaries(self) -> None:
        # Leftovers of a crash mid-save; recent ones may belong to another live process.
        now = time.time()
        for tmp in self.root.glob(f"{_TMP_PREFIX}*"):
            try:
                if now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                    tmp.unlink()
                    logger.info("removed stale temporary file %s", tmp)
            except OSError:
                pass
