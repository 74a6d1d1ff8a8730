"""Where the API may touch the server's disk: data files only inside the folders allowed at launch
(``--mezo-data-dir``), checkpoints only inside ``--mezo-output-dir``, as a relative name, never over the base
checkpoint, and a folder replaced only if this project wrote it (it holds :data:`MARKER`).

A path is judged after it is resolved (``..`` and symlinks followed), so neither walks out of an allowed folder; a
``datasets`` folder is judged by everything below it and every file its ``state.json`` names. Refusals name the flag
and the path the request gave; they never say whether something outside exists. The folders themselves are the
operator's: whoever can write into a data folder can make it point elsewhere between this check and the read.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from sglang_mezo.jobs.errors import Conflict, Forbidden, InvalidRequest
from sglang_mezo.options import Folders

MARKER = ".sglang-mezo-checkpoint"
"""Written into every folder POST /mezo/save creates: only such a folder may be overwritten."""
_STAGING_SUFFIX = ".partial-00000000"
MAX_FOLDER_NAME_BYTES = 255 - len("." + _STAGING_SUFFIX)
"""A checkpoint folder's name, in bytes: what the file system takes (255) less what its staging name adds."""
MAX_CHECKPOINT_NAME_CHARS = 1024
"""A checkpoint's name (its folders joined by /), in characters: far below any file system's path limit."""


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or path.is_relative_to(folder)


@dataclass(frozen=True)
class FileAccess:
    data_dirs: tuple[Path, ...]
    output_dir: Path | None
    base_model: Path

    @classmethod
    def of(cls, folders: Folders, base_model: str) -> FileAccess:
        return cls(tuple(Path(d).resolve() for d in folders.data_dirs),
                   Path(folders.output_dir).resolve() if folders.output_dir else None, Path(base_model).resolve())

    def data_file(self, requested: str) -> Path:
        """The data file (or ``datasets`` folder) a request names: relative to an allowed folder (the first that
        has it), or absolute inside one."""
        if not self.data_dirs:
            raise Forbidden("reading data files on the server is off: the server was started without "
                            "--mezo-data-dir")
        given = Path(requested)
        candidates = [given] if given.is_absolute() else [d / given for d in self.data_dirs]
        inside = [r for r in map(_resolved, candidates) if r is not None and any(_inside(r, d) for d in self.data_dirs)]
        if not inside:
            raise Forbidden(f"{requested} is not inside a folder the server may read data from (--mezo-data-dir)")
        for path in inside:
            if path.exists():
                folder = next(d for d in self.data_dirs if _inside(path, d))
                if path.is_dir() and not _stays_inside(path, folder):
                    raise Forbidden(f"{requested} refers to files outside the folder the server may read data "
                                    "from (--mezo-data-dir)")
                return path
        raise InvalidRequest(f"no such file or folder in the data folders: {requested}")

    def checkpoint_target(self, name: str, overwrite: bool) -> CheckpointTarget:
        """Where a checkpoint named ``name`` goes: checked now, written into a staging folder beside it, and put in
        place (replacing an earlier save of that name, with ``overwrite``) only once it is whole."""
        if self.output_dir is None:
            raise Forbidden("saving on the server is off: the server was started without --mezo-output-dir")
        if not name or Path(name).is_absolute():
            raise InvalidRequest(f"give the checkpoint a name relative to the output folder (--mezo-output-dir), "
                                 f"not {_quoted(name)}")
        if len(name) > MAX_CHECKPOINT_NAME_CHARS or any(len(part.encode()) > MAX_FOLDER_NAME_BYTES
                                                         for part in Path(name).parts):
            raise InvalidRequest(f"the checkpoint name {_quoted(name)} is too long: at most "
                                 f"{MAX_CHECKPOINT_NAME_CHARS} characters, and {MAX_FOLDER_NAME_BYTES} bytes a folder")
        target = _resolved(self.output_dir / name)
        if target is None:
            raise InvalidRequest(f"{name!r} is not a usable folder name")
        if target == self.output_dir or not _inside(target, self.output_dir):
            raise Forbidden(f"{name} is not inside the output folder (--mezo-output-dir)")
        if _inside(target, self.base_model) or _inside(self.base_model, target):
            raise Conflict("refusing to write over the base checkpoint: resets re-read it")
        if target.exists():
            if not (target / MARKER).is_file():
                raise Conflict(f"{name} exists and was not written by sglang-mezo: it is never overwritten")
            if not overwrite:
                raise Conflict(f"{name} exists (set overwrite to replace it)")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}{_STAGING_SUFFIX[:-8]}{uuid.uuid4().hex[:8]}")
        staging.mkdir()
        (staging / MARKER).write_text("a checkpoint written by sglang-mezo (POST /mezo/save)\n")
        return CheckpointTarget(target, staging)


@dataclass(frozen=True)
class CheckpointTarget:
    final: Path
    staging: Path

    def commit(self) -> None:
        """The staged checkpoint takes the final name; an earlier one of that name goes only then."""
        old = self.final.with_name(f".{self.final.name}.old-{uuid.uuid4().hex[:8]}")
        if self.final.exists():
            self.final.rename(old)
        self.staging.rename(self.final)
        shutil.rmtree(old, ignore_errors=True)

    def abandon(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def _stays_inside(folder: Path, allowed: Path) -> bool:
    """Whether everything a ``datasets`` folder can make a reader open stays inside ``allowed``: every entry below it
    (symlinks followed) and every file its ``state.json`` names."""
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            resolved = _resolved(Path(root, name))
            if resolved is None or not _inside(resolved, allowed):
                return False
        if "state.json" in files:
            try:
                state = json.loads(Path(root, "state.json").read_text())
                named = [f["filename"] for f in state.get("_data_files", [])]
            except (OSError, ValueError, TypeError, KeyError, AttributeError):
                return False  # not a state.json we can vouch for
            for filename in named:
                resolved = _resolved(Path(root, str(filename)))
                if resolved is None or not _inside(resolved, allowed):
                    return False
    return True


def _quoted(name: str, limit: int = 60) -> str:
    """A name a request gave, for an error message: quoted, and cut short if long."""
    return repr(name) if len(name) <= limit else repr(name[:limit]) + f"... ({len(name)} characters)"


def _resolved(path: Path) -> Path | None:
    """The path with ``..`` and symlinks followed; None if it cannot be (a symlink loop, a NUL byte)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError, ValueError):
        return None
