"""Many rasters, one outcome each: the plan (which outputs are finished, which continue), the
serial runner and the tally behind the one progress bar. `cluster.run_jobs` picks this serial
runner or Ray's actor pool (the same jobs, the same outcomes); both run every raster through
`run_one`, that is `predict_file`. This module never imports `cluster` (no import cycle)."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from segdeploy.errors import UserError
from segdeploy.predict import PredictOptions, PredictResult, predict_file
from segdeploy.raster import companion_paths, is_picture, output_for, partial_paths
from segdeploy.vector import VectorOptions

TileCallback = Callable[[int, int, int, int], None]  # (job index, tiles done, tiles in all, pixels)


@dataclass
class Job:
    """One raster to predict: its position in the batch, the input (a path or GDAL /vsi string), the output, and
    whether to resume it."""
    index: int
    src: Path | str
    out: Path
    resume: bool = False  # an unfinished output of this raster continues where it stopped


@dataclass
class Outcome:
    """One raster's result: its PredictResult, or the one-line error naming it, and the georeference warnings."""
    job: Job
    result: PredictResult | None = None
    error: str | None = None  # one line naming the raster
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The outcome as JSON types (predict's `--json` per raster)."""
        if self.result is not None:
            return self.result.to_dict() | {"warnings": self.warnings}
        return {"input": str(self.job.src), "output": str(self.job.out), "error": self.error}


def plan_jobs(files: list[Path | str], out: Path, many: bool, resume: bool,
              overwrite: bool = False, vector: VectorOptions | None = None,
              probs: bool = False) -> tuple[list[Job], list[Job]]:
    """(to run, already finished), by the rule every verb keeps: a finished output is replaced only
    with `overwrite`, an unfinished one continues only with `resume` (without it `predict_file`
    refuses to start it over, unless `overwrite`). With `resume` a finished output is skipped, but
    with `vector` one whose vector file is missing is predicted again (the same raster, and now its
    polygons).

    Raises UserError, before any work, for an output name that cannot hold the result (a picture's
    prediction is a PNG, a raster's a GeoTIFF; several inputs need a directory), an output that is
    one of the inputs, or whose overlay, preview or confidence raster (`probs`) would be (even with
    --overwrite: predict never replaces what it reads), two inputs that
    would write one output (or one vector file), finished outputs without --overwrite or --resume,
    and a vector file that exists beside a raster that does not (not a finished output: replaced
    only with --overwrite)."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; pass one of them")
    check_output_name(files, out, many)
    todo: list[Job] = []
    finished: list[Job] = []
    seen: dict[Path, str] = {}
    inputs = {_identity(Path(f)): Path(f) for f in files if not isinstance(f, str) and Path(f).is_file()}
    for i, src in enumerate(files):
        target = output_for(src, out, many)
        _refuse_writing_an_input(inputs, [target, *companion_paths(target, is_picture(src), probs)]
                                 + ([vector.path_for(target)] if vector is not None else []))
        if target in seen:
            raise UserError(f"{src} and {seen[target]} would both be written to {target}; "
                            "rename one or predict them into separate --out directories")
        seen[target] = str(src)
        if vector is not None:  # a.png and a.tif give a_pred.png and a_pred.tif, but one a_pred.gpkg
            polygons = vector.path_for(target)
            if polygons in seen:
                raise UserError(f"{src} and {seen[polygons]} would both write their polygons to {polygons}; "
                                "rename one or predict them into separate --out directories")
            seen[polygons] = str(src)
        state, _ = partial_paths(target)
        job = Job(i, src, target, resume=resume and state.is_file())
        done = target.is_file() and not state.is_file()
        vector_missing = vector is not None and not vector.path_for(target).is_file()
        if vector is not None and not vector_missing and not done and not job.resume and not overwrite:
            raise UserError(f"{vector.path_for(target)} already exists: a finished output is replaced only with "
                            "--overwrite; pass --overwrite to replace it, or another --vector")
        if done and resume and not overwrite:
            _refuse_skipping_another_inputs_output(src, target)
        (finished if done and not overwrite and not (resume and vector_missing) else todo).append(job)
    if finished and not resume:
        first = finished[0].out
        what = f"{first} already exists" if len(finished) == 1 else \
            f"{len(finished)} of the {len(files)} outputs already exist (first: {first})"
        raise UserError(f"{what}: a finished prediction is replaced only with --overwrite; pass --overwrite to "
                        "replace it, --resume to skip finished outputs, or another --out")
    return todo, finished


def _refuse_writing_an_input(inputs: dict[tuple[int, int], Path], outputs: list[Path]) -> None:
    """An output that is one of the inputs (the same file under any name; `inputs` by device and
    inode) is refused: the input would be replaced by its own prediction, and `--overwrite` (which
    replaces finished outputs) does not make it one."""
    for output in outputs:
        if output.exists() and (src := inputs.get(_identity(output))) is not None:
            what = f"--out {output} is the input {src} itself" if output == outputs[0] else \
                f"predict would write {output} beside --out {outputs[0]}, and that is the input {src}"
            fix = outputs[0].with_name(outputs[0].stem + "_pred" + outputs[0].suffix)
            raise UserError(f"{what}, and predict never replaces what it reads (not even with --overwrite); pass "
                            f"another --out, e.g. --out {fix}")


def _identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino


def _refuse_skipping_another_inputs_output(src: Path | str, target: Path) -> None:
    """--resume skips a finished output only when it was predicted from this input (the tag the
    writer leaves, `raster.finished_source`); an output that does not say is skipped as before."""
    from segdeploy.raster import finished_source, input_id

    made_from = finished_source(target)
    if made_from is not None and made_from != input_id(src):
        raise UserError(f"{target} is a finished prediction of {made_from}, not of {src}: --resume skips only "
                        "outputs of the same input; to replace it, pass --overwrite instead of --resume (or another --out)")


def check_output_name(files: list[Path | str], out: Path, many: bool) -> None:
    """Refuse an --out that cannot hold what predict writes, instead of writing another name."""
    from segdeploy.raster import PICTURE, RASTER, is_picture

    if many:
        if out.exists() and not out.is_dir():
            raise UserError(f"{len(files)} inputs give one output each, so --out must be a directory, and {out} is "
                            f"a file; pass a directory (e.g. --out {out.with_suffix('')}/)")
        if not out.exists() and out.suffix.lower() in RASTER | PICTURE:
            raise UserError(f"{len(files)} inputs give one output each, so --out must be a directory, not a "
                            f"{out.suffix} file name; pass e.g. --out {out.with_suffix('')}/")
        return
    src, suffix = files[0], out.suffix.lower()
    if is_picture(src) and suffix != ".png":
        raise UserError(f"{src} is a picture, and its prediction is a class PNG (plus an overlay PNG), which "
                        f"{out.name} cannot hold; pass --out {out.with_suffix('.png')}")
    if not is_picture(src) and suffix not in (".tif", ".tiff"):
        raise UserError(f"{src} is a raster, and its prediction is a GeoTIFF, which {out.name} cannot hold; "
                        f"pass --out {out.with_suffix('.tif')} (or a directory)")


def run_one(backend, job: Job, opts: PredictOptions,  # noqa: ANN001 - a runtime Backend
            on_tiles: TileCallback | None = None, keep_going: bool = True) -> Outcome:
    """One raster through the streaming predictor; a user error becomes the outcome's error line,
    and with `keep_going` so does any other exception (the other rasters go on; the CLI exits
    non-zero at the end). Georeference warnings are kept for the summary."""
    from dataclasses import replace

    def tiles(done: int, total: int, pixels: int) -> None:
        if on_tiles:
            on_tiles(job.index, done, total, pixels)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = predict_file(backend, job.src, job.out, replace(opts, resume=job.resume), progress=tiles)
        except Exception as exc:  # noqa: BLE001 - one raster's failure must not stop a batch
            if not keep_going:
                raise
            text = " ".join(str(exc).split())[:400]
            what = "" if isinstance(exc, UserError) else f"unexpected {type(exc).__name__}: "
            named = "" if str(job.src) in text else f"{job.src}: "  # the message names the raster once
            return Outcome(job, error=f"{named}{what}{text}")
    notes = [str(w.message) for w in caught if "georeference" in str(w.message)]
    return Outcome(job, result=result, warnings=notes)


def run_serial(backend, jobs: list[Job], opts: PredictOptions,  # noqa: ANN001
               on_tiles: TileCallback | None = None) -> Iterator[Outcome]:
    """Outcomes of the jobs one after the other in this process with `backend`; with several jobs a failure becomes
    that raster's outcome and the rest go on (a single job raises)."""
    for job in jobs:
        yield run_one(backend, job, opts, on_tiles, keep_going=len(jobs) > 1)


class Tally:
    """One progress bar over many rasters: a finished raster counts 1, a running one its share of
    tiles done; MP/s over the wall time of the whole batch."""

    def __init__(self, rasters: int) -> None:
        self.rasters = rasters
        self.t0 = time.perf_counter()
        self.running: dict[int, tuple[float, int]] = {}  # job index -> (share of tiles done, pixels)
        self.done = 0
        self.failed = 0
        self.pixels_done = 0.0

    def tiles(self, index: int, done: int, total: int, pixels: int) -> None:
        """Record raster `index`'s progress: `done` of `total` tiles, `pixels` in the raster."""
        self.running[index] = (done / max(total, 1), pixels)

    def finish(self, outcome: Outcome) -> None:
        """Count a finished raster (and its pixels, or a failure)."""
        self.running.pop(outcome.job.index, None)
        self.done += 1
        if outcome.error:
            self.failed += 1
        else:
            self.pixels_done += outcome.result.pixels  # type: ignore[union-attr] - written now, not resumed

    @property
    def completed(self) -> float:
        """Rasters done, plus the tile share of those running (for the bar)."""
        return self.done + sum(share for share, _ in self.running.values())

    @property
    def seconds(self) -> float:
        """Wall seconds since the batch started."""
        return time.perf_counter() - self.t0

    @property
    def megapixels_per_s(self) -> float:
        """Megapixels predicted per wall second over the batch, running rasters counted by their share."""
        pixels = self.pixels_done + sum(share * px for share, px in self.running.values())
        return pixels / 1e6 / max(self.seconds, 1e-9)
