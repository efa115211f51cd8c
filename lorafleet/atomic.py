"""Write a directory all at once: build it in a sibling temp dir, then rename it into place.

A crash, a full disk or Ctrl-C leaves either the old state or the complete new directory,
never half an adapter or half a model.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from lorafleet.errors import UserError


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir next to `out`; on success it becomes `out` (rename is atomic on one fs)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"output directory {out} already exists; choose another path or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any new directory
    try:
        yield tmp
        swap_in(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        full = disk_full(e)
        if full:
            raise UserError(f"{full} while writing {out}; nothing was written there. Free some space (or raise "
                            "the quota / volume size) or write to another directory, then run it again") from e
        raise


def leftovers(out: str | os.PathLike) -> list[Path]:
    """Temp and moved-aside directories a killed writer of `out` left next to it."""
    out = Path(out)
    return sorted(p for pattern in (f".{out.name}.tmp-*", f".{out.name}.old-*") for p in out.parent.glob(pattern)
                  if p.is_dir())


def swap_in(new: Path, out: Path) -> None:
    """Rename the finished directory `new` to `out`, replacing what is there.

    The old one is moved aside first, so there is no moment without a directory that is either
    complete-old or complete-new."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(new, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, out)


# ENOSPC: the file system is full; EDQUOT: a quota; EFBIG: a file-size limit (ulimit -f).
_FULL = {errno.ENOSPC: "the disk is full (no space left on device)", errno.EDQUOT: "the disk quota is exceeded",
         errno.EFBIG: "a file grew past the file-size limit"}


def disk_full(e: BaseException) -> str | None:
    """Name the disk-full condition behind `e`, if any, including errors that libraries re-raise as text."""
    for err in (e, e.__cause__, e.__context__):
        if isinstance(err, OSError) and err.errno in _FULL:
            return _FULL[err.errno]
    text = str(e)
    for code, why in _FULL.items():
        if os.strerror(code) in text:  # e.g. safetensors' Rust I/O error carries only the message
            return why
    return None


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace the file at `path` with `text` in one rename: a reader sees the old file or the new
    one, never half of it (a replica following the file, a ConfigMap sync). Mode as open() gives."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
