"""Uploaded files (``/v1/files``): kept in a ``files`` folder of the first ``--mezo-data-dir``, one content file and
one metadata file per upload, named by an id this server made (``file-`` and 24 hex digits), so nothing a client
sends becomes a path. A file is written under a temporary name and renamed when whole, its metadata last: a crash
leaves either the whole upload or none of it in the listing. The files outlive a restart, as the data folder does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from sglang_mezo.jobs.errors import Forbidden, InvalidRequest, NotFound, TooMany
from sglang_mezo.options import Limits

PURPOSES = ("fine-tune",)
"""What an upload may be for: training and validation files of fine-tuning jobs (OpenAI's other purposes, batch,
assistants, vision, have no use here)."""
RESULTS = "fine-tune-results"
"""The purpose of the files a job leaves (its metrics and trajectory): the server's to make, never an upload's."""

logger = logging.getLogger(__name__)

_ID = re.compile(r"file-[0-9a-f]{24}")


@dataclass(frozen=True)
class StoredFile:
    """An upload, as OpenAI's file object describes it."""

    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str

    def to_openai(self) -> dict:
        return {"object": "file", **asdict(self), "status": "processed", "status_details": None,
                "expires_at": None}


class FileStore:
    def __init__(self, folder: Path | None, max_files: int) -> None:
        """``folder`` None: uploads are off (the server has no ``--mezo-data-dir``)."""
        self.folder = folder
        self.max_files = max_files

    def _open(self) -> Path:
        if self.folder is None:
            raise Forbidden("file uploads are off: the server was started without --mezo-data-dir (uploads are "
                            "kept in its first folder)")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _unwritable(exc) from None
        return self.folder

    def create(self, filename: str, purpose: str, data: bytes) -> StoredFile:
        if purpose not in PURPOSES:
            raise InvalidRequest(f"purpose must be one of {', '.join(PURPOSES)}, not {purpose!r}")
        if not data:
            raise InvalidRequest("the file is empty")
        return self._keep(filename, purpose, data)

    def create_result(self, filename: str, data: bytes) -> StoredFile:
        """A file a job produced (purpose ``fine-tune-results``)."""
        return self._keep(filename, RESULTS, data)

    def _keep(self, filename: str, purpose: str, data: bytes) -> StoredFile:
        folder = self._open()
        if len(self.list()) >= self.max_files:
            raise TooMany(f"this server keeps at most {self.max_files} uploaded files "
                          f"({Limits.flag('max_stored_files')}): delete some first")
        stored = StoredFile(f"file-{uuid.uuid4().hex[:24]}", len(data), int(time.time()),
                            Path(filename or "upload").name[:255], purpose)
        try:
            _write(folder / f"{stored.id}.data", data)
            _write(folder / f"{stored.id}.json", json.dumps(asdict(stored)).encode())
        except OSError as exc:  # read-only or full: nothing half-kept is listed (the metadata is written last)
            with contextlib.suppress(OSError):
                (folder / f"{stored.id}.data").unlink(missing_ok=True)
            raise _unwritable(exc) from None
        return stored

    def list(self, purpose: str | None = None) -> list[StoredFile]:
        """Newest first."""
        if self.folder is None or not self.folder.is_dir():
            return []
        found = (self._read(meta.stem) for meta in self.folder.glob("file-*.json"))
        kept = [f for f in found if f is not None and (purpose is None or f.purpose == purpose)]
        return sorted(kept, key=lambda f: (f.created_at, f.id), reverse=True)

    def get(self, file_id: str) -> StoredFile:
        stored = self._read(file_id)
        if stored is None:
            raise NotFound(f"no file {file_id!r} on this server")
        return stored

    def _read(self, file_id: str) -> StoredFile | None:
        """An upload whose content and metadata are both whole; None for anything else (an id this server did not
        make, a file torn or written by something else), so a client's string is never a path."""
        if self.folder is None or not _ID.fullmatch(file_id) or not (self.folder / f"{file_id}.data").is_file():
            return None
        try:
            stored = StoredFile(**json.loads((self.folder / f"{file_id}.json").read_text()))
        except (OSError, ValueError, TypeError):
            return None
        return stored if stored.id == file_id else None

    def path(self, file_id: str) -> Path:
        """Where the content of an existing file is."""
        self.get(file_id)
        assert self.folder is not None
        return self.folder / f"{file_id}.data"

    def delete(self, file_id: str) -> None:
        self.get(file_id)
        assert self.folder is not None
        try:
            (self.folder / f"{file_id}.json").unlink(missing_ok=True)  # out of the listing first
            (self.folder / f"{file_id}.data").unlink(missing_ok=True)
        except OSError as exc:
            raise _unwritable(exc) from None


def _unwritable(exc: OSError) -> Forbidden:
    """The client's answer when the files folder cannot be written: the reason, never the server's path (which the
    log keeps)."""
    logger.error("the uploads' folder cannot be written: %s", exc)
    return Forbidden(f"the server cannot write its uploads' folder ({exc.strerror or type(exc).__name__})")


def _write(path: Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.partial")
    with partial.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    partial.replace(path)
