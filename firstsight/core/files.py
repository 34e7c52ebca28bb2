"""Build-once directories shared by runs (offline tokenizer, trained tiny teachers).

A directory is built in a temporary sibling and renamed into place in one step, under a file
lock, so concurrent sweep jobs build it once and a killed build never leaves a half-written one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from filelock import FileLock

from firstsight.core.errors import FirstSightError

COMPLETE_MARKER = "firstsight_complete.json"
# Directories built with the default settings ship with the package, under the same names, so
# the default run needs neither the offline tokenizer training nor the tiny teacher's pre-training.
SHIPPED = Path(__file__).resolve().parents[1] / "assets"  # firstsight/assets


def content_key(*parts: Any) -> str:
    """A short stable hash of everything that determines a cached artefact."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cached_dir(path: Path, build: Callable[[Path], Any]) -> Path:
    """Return the shipped directory of `path`'s name if there is one, else `path`, building it
    first with `build(tmp_dir)` if it is not complete yet."""
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
    A write the disk refuses (full, over quota, read-only: firstsight.models.loading' write-failure test)
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
            free = free_bytes(str(path.parent))
            if is_write_failure(err, free):
                kept = f"{path} keeps its previous contents" if existed else f"nothing was left at {path}"
                raise FirstSightError(write_failure(str(path), err, free, kept)) from err
        raise


_LOW_FREE_BYTES = 64 << 20  # less free space than this after a failed write: the disk is (nearly) full
_WRITE_FAILURE_TEXT = (
    "no space left",
    "disk quota",
    "storagefull",
    "ioerror",
    "file write failed",
    "pytorchstreamwriter failed",
    "read-only file system",
)


@contextlib.contextmanager
def staged_dir(out_dir: str, kept: Optional[str] = None) -> Iterator[str]:
    """A temporary sibling of `out_dir` to write into; on success it replaces `out_dir` by renames,
    so readers see the old directory or the complete new one, never a half-written one.
    A write that fails (a full disk, a quota, a read-only file system) becomes a FirstSightError
    naming the directory and the free space left; the partial write is removed and the previous
    `out_dir` stays as it was (`kept`: what the caller keeps instead, said in the message)."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    existed = os.path.exists(out_dir)
    tmp = None
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a checkpoint is shared like any output
        yield tmp
        if os.path.exists(out_dir):
            old = tmp + ".old"
            os.replace(out_dir, old)
            try:
                os.replace(tmp, out_dir)
            except OSError:
                os.replace(old, out_dir)  # the previous version goes back in place
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except Exception as err:  # noqa: BLE001 - write failures are reported, anything else re-raised
        free = free_bytes(parent)
        if not is_write_failure(err, free):
            raise
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise FirstSightError(
            write_failure(
                out_dir,
                err,
                free,
                kept or (f"{out_dir} keeps its previous contents" if existed else f"nothing was left at {out_dir}"),
            )
        ) from err
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def free_bytes(path: str) -> Optional[int]:
    try:
        return shutil.disk_usage(path if os.path.isdir(path) else os.path.dirname(path) or ".").free
    except OSError:
        return None


def is_write_failure(err: BaseException, free: Optional[int]) -> bool:
    """OSError (ENOSPC, EDQUOT, EROFS...), or a writer's own error (torch.save's RuntimeError,
    safetensors' SafetensorError) that says so or that came with the disk (nearly) full."""
    if isinstance(err, OSError):
        return True
    text = str(err).lower()
    return any(fragment in text for fragment in _WRITE_FAILURE_TEXT) or (free is not None and free < _LOW_FREE_BYTES)


def write_failure(out_dir: str, err: BaseException, free: Optional[int], kept: str) -> str:
    full = getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "no space left" in str(err).lower()
    reason = "the disk is full" if full else f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:300]}"
    space = f"{free / 1e9:.2f} GB free" if free is not None else "free space unknown"
    return (
        f"could not write {out_dir}: {reason} ({space} on the file system of {os.path.dirname(out_dir)}). "
        f"The partial write was removed and {kept}. Free some space, or write elsewhere "
        f"(hydra.run.dir=<a directory on another disk>), then run again."
    )
