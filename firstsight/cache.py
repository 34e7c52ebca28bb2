"""Build-once directories shared by runs (offline tokenizer, trained tiny teachers).

A directory is built in a temporary sibling and renamed into place in one step, under a file
lock, so concurrent sweep jobs build it once and a killed build never leaves a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

COMPLETE_MARKER = "firstsight_complete.json"
# Directories built with the default settings ship with the package, under the same names, so
# the default run needs neither the offline tokenizer training nor the tiny teacher's pre-training.
SHIPPED = Path(__file__).parent / "assets"


def content_key(*parts: Any) -> str:
    """A short stable hash of everything that determines a cached artefact."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cached_dir(path: Path, build: Callable[[Path], Any]) -> Path:
    """Return the shipped directory of `path`'s name if there is one, else `path`, building it
    first with `build(tmp_dir)` if it is not complete yet."""
    from filelock import FileLock

    path = Path(path)
    if (SHIPPED / path.name / COMPLETE_MARKER).is_file():
        return SHIPPED / path.name
    if (path / COMPLETE_MARKER).is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if (path / COMPLETE_MARKER).is_file():  # another job built it while we waited
            return path
        tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp-", dir=path.parent))
        try:
            info = build(tmp)
            (tmp / COMPLETE_MARKER).write_text(json.dumps(info or {}, indent=2, default=str))
            if path.exists():  # an incomplete leftover of a killed build
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_info(path: Path) -> dict:
    return json.loads((Path(path) / COMPLETE_MARKER).read_text())


def write_atomically(path: Path, data: Any) -> None:
    """Write `data` (str or bytes) to a temporary file beside `path`, then rename it over `path`.
    A write the disk refuses (full, over quota, read-only: firstsight.models' write-failure test)
    raises a FirstSightError naming the directory and its free space; `path` keeps its previous
    contents and no temporary file is left behind."""
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    existed = path.exists()
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        with os.fdopen(handle, "wb") as f:
            f.write(raw)
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, Exception):
            from firstsight.errors import FirstSightError
            from firstsight.models import _free_bytes, _is_write_failure, _write_failure

            free = _free_bytes(str(path.parent))
            if _is_write_failure(err, free):
                kept = f"{path} keeps its previous contents" if existed else f"nothing was left at {path}"
                raise FirstSightError(_write_failure(str(path), err, free, kept)) from err
        raise
