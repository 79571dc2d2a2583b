"""Folders prepared once in a shared place (``~/.cache/st_synth/...``), safely for many processes.

Every rank of a ``torchrun`` job, and every job on a machine, may ask for the same converted backbone or
prepared data at the same moment. :func:`build_once` lets one process build it, under an exclusive file
lock, into a temporary folder beside the target that is renamed into place only when complete; the others
wait on the lock and then read the finished folder. A folder is therefore never seen half-written, and a
build killed halfway leaves only a temporary folder that the next build removes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TEMPORARY_PREFIX = ".building-"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created if missing) for as long as the block runs, across processes.
    Where the platform has no ``fcntl`` (Windows) the block runs unlocked: the rename still keeps readers
    from a half-written folder."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on the platforms CI runs
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def has_weights(folder: Path) -> bool:
    """Whether ``folder`` holds a saved transformers model (config and safetensors weights)."""
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def build_once(folder: str | Path, build: Callable[[Path], None],
               complete: Callable[[Path], bool] | None = None) -> Path:  # fmt: skip
    """``folder``, built by ``build(temporary_folder)`` if it is not there yet, by one process at a time.

    Args:
        folder: Where the result lives.
        build: Writes the result into the (empty, existing) folder it is given.
        complete: Whether an existing ``folder`` is usable; default: it exists. A folder that fails it (left
            half-written by a release that wrote in place) is built again.

    Returns:
        ``folder``.
    """
    folder = Path(folder)
    complete = complete or Path.is_dir
    if complete(folder):
        return folder
    with file_lock(folder.parent / f".{folder.name}.lock"):
        if complete(folder):  # another process built it while this one waited
            return folder
        for leftover in folder.parent.glob(f"{TEMPORARY_PREFIX}{folder.name}.*"):
            shutil.rmtree(leftover, ignore_errors=True)  # a killed build's; the lock says nobody is on it
        temporary = Path(tempfile.mkdtemp(prefix=f"{TEMPORARY_PREFIX}{folder.name}.", dir=folder.parent))
        temporary.chmod(0o755)  # mkdtemp's 0700 would keep a shared cache from other users
        try:
            build(temporary)
            if not complete(temporary):
                raise RuntimeError(
                    f"Preparing {folder} left an incomplete folder ({sorted(p.name for p in temporary.iterdir())}). "
                    "Under torch.distributed only rank 0's save_pretrained writes: prepare it on rank 0 first."
                )
            if folder.exists():
                logger.warning("Replacing the incomplete %s", folder)
                shutil.rmtree(folder) if folder.is_dir() else folder.unlink()
            os.rename(temporary, folder)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
    return folder


def fingerprint(*parts: Any) -> str:
    """A short digest of ``parts`` (anything JSON can write, other values by ``str``): what a stage's saved
    result is keyed on, so it is reused only while the inputs and settings that made it are unchanged."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]
