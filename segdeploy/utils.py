"""Small shared helpers: atomic writes, device choice, environment facts."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn


def current_umask() -> int:
    """The process umask (reading it means setting it; restored at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain `open(path, "w")` would give a new file: 0666 less the umask."""
    return 0o666 & ~current_umask()


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `path` only if the block succeeds.

    Readers never see a half-written file: either the old one, the new one, or none. The final
    file gets the mode the umask gives new files (mkstemp alone would leave it 0600).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    except OSError as exc:
        raise_write_error(path, exc)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
            if tmp_path.exists():
                os.chmod(tmp_path, file_mode())
            os.replace(tmp_path, path)
        except OSError as exc:
            if exc.errno in WRITE_ERRNOS or exc.filename in (str(tmp_path), str(path)):
                raise_write_error(path, exc)
            raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def raise_write_error(path: Path | str, exc: OSError) -> NoReturn:
    """An OSError while writing `path` as the one-line user error it is (read-only, full, denied…)."""
    from segdeploy.errors import OutputError

    raise OutputError(describe_write_error(path, exc)) from None


def describe_write_error(path: Path | str, exc: OSError, action: str = "write") -> str:
    hints = {
        errno.ENOSPC: "the disk is full; free space or write elsewhere",
        errno.EDQUOT: "the disk quota is exceeded; free space or write elsewhere",
        errno.EROFS: "the file system is read-only; write elsewhere",
        errno.EACCES: "permission denied; choose a writable location",
        errno.EPERM: "operation not permitted; choose a writable location",
        errno.ENOENT: "its directory does not exist or cannot hold files; choose an existing, writable location",
        errno.ENOTDIR: "a parent of it is a file, not a directory; choose another location",
        errno.EISDIR: "it is a directory; give a file name",
    }
    hint = hints.get(exc.errno or -1, f"{exc.strerror or exc}; choose another location")
    return f"cannot {action} {path}: {hint}"


def write_json(path: Path | str, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def cpu_count() -> int:
    """Cores this process may use (the affinity mask, as in a container), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pick_device(requested: str = "auto") -> str:
    import torch

    from segdeploy.errors import BackendUnavailable

    if requested == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable("train.device is 'cuda' but no CUDA GPU is visible; use 'auto' or 'cpu'")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    import resource
    import sys

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def versions() -> dict[str, str]:
    """Versions of what made or runs a model, from the installed distributions' metadata (no
    package is imported for this: the core install has no torch)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import segdeploy

    out = {"segdeploy": segdeploy.__version__, "python": platform.python_version()}
    for key, dists in (("torch", ("torch",)), ("timm", ("timm",)),
                       ("segmentation_models_pytorch", ("segmentation-models-pytorch",)), ("onnx", ("onnx",)),
                       ("onnxruntime", ("onnxruntime", "onnxruntime-gpu"))):
        for dist in dists:
            try:
                out[key] = version(dist)
                break
            except PackageNotFoundError:
                continue
    return out


@contextmanager
def live_progress(progress: Any) -> Iterator[Any]:
    """Run a rich Progress; when the block fails, clear the bar instead of leaving a stale line
    (like "0/? tiles") above the error."""
    with progress:
        try:
            yield progress
        except BaseException:
            progress.live.transient = True
            raise


def writable_location(path: Path) -> Path:
    """The directory that will hold `path` (`path` itself when it is a directory, else its nearest
    existing ancestor: an existing file is replaced in its folder), proven writable by creating and
    removing a temporary directory there; raises OutputError naming `path`."""
    probe_dir = path if path.is_dir() else path.parent
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise_write_error(path, NotADirectoryError(errno.ENOTDIR, "not a directory", str(probe_dir)))
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".segdeploy-probe-", dir=probe_dir))
    except OSError as exc:
        raise_write_error(path, exc)
    return probe_dir


def file_sha256(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
