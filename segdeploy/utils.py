"""Small shared helpers: atomic writes, device choice, environment facts."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
import threading
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
    """One line for a failed `action` on `path`: the OS error's meaning and what to do (disk full, read-only,
    permissions…)."""
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
    """`obj` as indented JSON at `path`, atomically (numpy and Path values converted)."""
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
    """'cuda' or 'cpu' for `requested` ('auto': CUDA when visible); BackendUnavailable for 'cuda' without a GPU."""
    import torch

    from segdeploy.errors import BackendUnavailable

    if requested == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable("train.device is 'cuda' but no CUDA GPU is visible; use 'auto' or 'cpu'")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB: VmHWM where /proc has it. Not
    getrusage's ru_maxrss there: on Linux a process started by another counts that parent's
    resident memory at the fork (exec folds the old address space's high-water mark into it:
    a bare `python -c pass` spawned by a 600 MB process reports 617 MB)."""
    import resource
    import sys

    hwm = _proc_status_mb("VmHWM")
    if hwm is not None:
        return hwm
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


class RssSampler:
    """Peak resident memory of this process while a block runs, in MiB (VmRSS sampled every 10 ms by a
    thread, and at entry and exit); `.peak` after the block. Unlike `peak_rss_mb`, which is the
    process's lifetime peak, this measures one piece of work."""

    def __enter__(self) -> RssSampler:
        self.peak = _rss_mb()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_mb())


def _proc_status_mb(key: str) -> float | None:
    """A memory line of /proc/self/status (VmRSS, VmHWM: kB there) in MiB; None where /proc has none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _rss_mb() -> float:
    rss = _proc_status_mb("VmRSS")
    return peak_rss_mb() if rss is None else rss


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


def environment() -> dict[str, str]:
    """What `segdeploy --version` shows: each runtime's version and the devices it sees, one line
    each. A runtime that is not installed is said so (with the extra that brings it) and is not
    imported; one that is installed is imported to ask for its devices."""
    from importlib.metadata import PackageNotFoundError, version
    from importlib.util import find_spec
    import platform

    out = {"python": f"{platform.python_version()} ({platform.machine()}, {cpu_count()} CPU cores usable)"}
    if find_spec("torch") is None:
        out["torch"] = "not installed (pip install 'segdeploy[train]' for train/export)"
    else:
        import torch

        gpus = [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
        cuda = f", CUDA {torch.version.cuda}" if torch.version.cuda else ", CPU build"
        out["torch"] = f"{torch.__version__}{cuda}; devices: {', '.join(['cpu', *gpus])}"
    if find_spec("onnxruntime") is None:
        out["onnxruntime"] = "not installed (pip install segdeploy)"
    else:
        import onnxruntime

        out["onnxruntime"] = f"{onnxruntime.__version__}; providers: {', '.join(onnxruntime.get_available_providers())}"
    trt = None
    for dist in ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu11"):
        try:
            trt = version(dist)
            break
        except PackageNotFoundError:
            continue
    out["tensorrt"] = trt or "not installed (pip install 'segdeploy[trt]'; needs an NVIDIA GPU)"
    if find_spec("rasterio") is not None:
        import rasterio

        out["rasterio"] = f"{rasterio.__version__}, GDAL {rasterio.__gdal_version__}"
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


def check_replaceable(out: Path, overwrite: bool, marker: str | tuple[str, ...], what: str) -> bool:
    """The one rule for an output directory, in every verb: a new or empty one is written; one that
    holds an earlier result (it has `marker`, a relative path, or one of several) is replaced only
    with `overwrite`; one that holds anything else is never touched (segdeploy deletes only what it
    wrote). Returns whether `out` will be replaced; raises OutputError naming the flag that fits."""
    from segdeploy.errors import OutputError

    if not out.exists():
        return False
    if not out.is_dir():
        raise OutputError(f"{out} is a file, not a directory; choose another output directory")
    if not any(out.iterdir()):
        return False
    markers = (marker,) if isinstance(marker, str) else marker
    if not any((out / m).is_file() for m in markers):
        raise OutputError(f"{out} is not empty and does not hold an earlier {what} (no {' or '.join(markers)}); "
                          "choose a new or empty directory (segdeploy never deletes files it did not write)")
    if not overwrite:
        article = "an" if what[:1] in "aeiou" else "a"
        raise OutputError(f"{out} already holds {article} {what}; pass --overwrite to replace it (the old one is kept "
                          "until the new one is complete), or choose another directory")
    return True


@contextmanager
def staged_dir(out: Path, overwrite: bool, marker: str | tuple[str, ...], what: str) -> Iterator[Path]:
    """Write a directory output into a hidden sibling and put it in place only when the block
    succeeds, replacing an earlier one (by `check_replaceable`'s rule): an interrupted or failed
    run leaves the old output as it was and no half-made one. Yields the directory to write into."""
    import shutil

    check_replaceable(out, overwrite, marker, what)
    writable_location(out.parent if out.parent.exists() else out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.new-*"):  # left by a killed earlier run
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-", dir=out.parent))
    try:
        yield work
        swap_in(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def swap_in(new: Path, out: Path) -> None:
    """Put the finished directory `new` where `out` is (or was); the old one goes only after that
    succeeded, and comes back if it did not."""
    import shutil

    os.chmod(new, 0o777 & ~current_umask())  # mkdtemp made it 0700
    if not out.exists():
        os.replace(new, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    try:
        os.replace(new, out)
    except OSError:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


_SHA256: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> digest: a file is hashed once per change


def file_sha256(path: Path | str) -> str:
    """The file's sha256 (hex); remembered for the same path, size and modification time, so the
    staleness checks of every export of a run hash each file once per process."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA256:
        _SHA256[key] = _hash_file(path)
    return _SHA256[key]


def _hash_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
