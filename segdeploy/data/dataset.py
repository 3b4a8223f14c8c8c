"""Dataset discovery (folders, list files, seeded ratios) and the torch Dataset."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from segdeploy.data.decode import ORIENTATIONS, BandCountError, ImageSource, open_image, read_mask
from segdeploy.data.io import decode_mask
from segdeploy.errors import DataError
from segdeploy.recipe import ClassesConfig, DataConfig
from segdeploy.tiling import normalize

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    """One training/eval sample: its key (the name shared by image and mask) and the two files."""
    key: str
    image: Path
    mask: Path


def data_root(cfg: DataConfig, source: str = "the recipe") -> Path:
    """The recipe's data.root as an existing directory; DataError naming `--data DIR` (and `data synth` to make one)
    when it is unset or missing. `source` names where data.root came from."""
    if cfg.root is None:
        raise DataError(f"data.root is not set in {source}; pass --data DIR")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data directory {root} not found; pass --data DIR (make one with `segdeploy data synth DIR`)")
    return root


def _keys_in(directory: Path, suffix: str) -> dict[str, Path]:
    if not directory.is_dir():
        return {}
    return {
        p.name[: -len(suffix)]: p
        for p in sorted(directory.iterdir())
        if p.name.endswith(suffix) and p.is_file() and len(p.name) > len(suffix)
    }


def masks_without_images(root: Path, cfg: DataConfig, split_dir: str) -> list[Path]:
    """Mask files of the split folder `split_dir` whose key has no image file (an unpaired mask)."""
    images = _keys_in(root / cfg.image_dir.format(split=split_dir), cfg.image_suffix)
    masks = _keys_in(root / cfg.mask_dir.format(split=split_dir), cfg.mask_suffix)
    return [path for key, path in masks.items() if key not in images]


def _pairs(root: Path, cfg: DataConfig, split_dir: str) -> tuple[list[Sample], list[Path]]:
    """Paired samples, and image files whose mask is missing."""
    image_dir = root / cfg.image_dir.format(split=split_dir)
    mask_dir = root / cfg.mask_dir.format(split=split_dir)
    images = _keys_in(image_dir, cfg.image_suffix)
    samples, unpaired = [], []
    for key, img in images.items():
        mask = mask_dir / f"{key}{cfg.mask_suffix}"
        if mask.is_file():
            samples.append(Sample(key, img, mask))
        else:
            unpaired.append(img)
    return samples, unpaired


def discover(cfg: DataConfig, split: str, *, strict: bool = True) -> list[Sample]:
    """Samples of one split. With `strict`, an image without a mask is an error."""
    root = data_root(cfg)
    mode = cfg.split.mode
    if mode == "folders":
        samples, unpaired = _pairs(root, cfg, split)
        where = root / cfg.image_dir.format(split=split)
    else:
        samples, unpaired = _pairs(root, cfg, "")
        where = root / cfg.image_dir.format(split="")
        if mode == "lists":
            if split not in cfg.split.lists:
                raise DataError(f"no list file for split {split!r} in data.split.lists; add one")
            keys = read_list(root / cfg.split.lists[split])
            by_key = {s.key: s for s in samples}
            missing = [k for k in keys if k not in by_key]
            if missing:
                raise DataError(
                    f"{root / cfg.split.lists[split]} names {len(missing)} ids without an image+mask pair "
                    f"(first: {missing[0]!r} expected {where / (missing[0] + cfg.image_suffix)})"
                )
            samples = [by_key[k] for k in keys]
            unpaired = [p for p in unpaired if p.name[: -len(cfg.image_suffix)] in set(keys)]
        else:
            paired = len(samples)
            samples = ratio_split(samples, cfg.split.ratios, cfg.split.seed).get(split, [])
            if not samples and paired:
                raise DataError(_empty_ratio_split(cfg, split, paired, where))
    if strict and unpaired:
        raise DataError(
            f"image {unpaired[0]} has no mask {root / cfg.mask_dir.format(split=split if mode == 'folders' else '')}"
            f"/{unpaired[0].name[: -len(cfg.image_suffix)]}{cfg.mask_suffix} ({len(unpaired)} unpaired); "
            "add the masks or remove the images"
        )
    if not samples:
        raise DataError(
            f"split {split!r} is empty: no '*{cfg.image_suffix}' images with masks under {where}; "
            "check data.root, data.image_dir and data.image_suffix"
        )
    return samples


def _empty_ratio_split(cfg: DataConfig, split: str, paired: int, where: Path) -> str:
    """Why a ratio split is empty although the images are there: the ratios, not the files; and
    ratios that would give it some (its share raised to max(0.1, 5/N), taken from the largest)."""
    ratios = dict(cfg.split.ratios)
    share = min(0.5, max(0.1, round(5 / paired, 2)))
    fixed = dict(ratios)
    largest = max((k for k in fixed if k != split), key=lambda k: fixed[k], default=None)
    if largest is not None:
        fixed[largest] = round(fixed[largest] - (share - fixed.get(split, 0.0)), 4)
    fixed[split] = share
    flow = "{" + ", ".join(f"{k}: {v:g}" for k, v in fixed.items()) + "}"
    given = f"gives it {ratios[split]:g}" if split in ratios else "has no entry for it"
    return (f"split {split!r} is empty because of the ratios, not the files: data.split.ratios {given} of the "
            f"{paired} image+mask pairs under {where} (seed {cfg.split.seed}), and the per-key hash put none there; "
            f"use e.g. --set 'data.split.ratios={flow}', or add images, or split by folders or lists")


def read_list(path: Path) -> list[str]:
    """The keys in a split list file: one per line, blank lines skipped, the first word of each (the rest may be a
    path or a comment). DataError when the file does not exist."""
    if not path.is_file():
        raise DataError(f"split list {path} not found; fix data.split.lists")
    keys = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return [k.split()[0] for k in keys]


def ratio_split(samples: list[Sample], ratios: dict[str, float], seed: int) -> dict[str, list[Sample]]:
    """Each key goes to the split its own hash of (seed, key) falls in: the same seed gives the same
    split, and adding or removing files never moves any other key (a test image stays a test image)."""
    names = list(ratios)
    edges = np.cumsum([ratios[n] for n in names])
    out: dict[str, list[Sample]] = {name: [] for name in names}
    for s in sorted(samples, key=lambda s: s.key):
        u = int(hashlib.sha256(f"{seed}:{s.key}".encode()).hexdigest()[:15], 16) / 16**15
        out[names[min(int(np.searchsorted(edges, u, side="right")), len(names) - 1)]].append(s)
    return out


def split_defined(cfg: DataConfig, split: str) -> bool:
    """Whether the layout has this split at all (a test split is optional)."""
    if cfg.split.mode == "lists":
        return split in cfg.split.lists
    if cfg.split.mode == "ratio":
        return cfg.split.ratios.get(split, 0) > 0
    return (data_root(cfg) / cfg.image_dir.format(split=split)).is_dir()


def eval_split(cfg: DataConfig, requested: str | None) -> tuple[str, str]:
    """(split to score, why it was chosen): `requested` when the layout defines it (refused, with
    the splits it does define, when it does not), else test when the layout has one, else val."""
    if requested is None:
        if split_defined(cfg, "test"):
            return "test", "the layout's test split (pass --split to choose another)"
        return "val", "the layout defines no test split"
    if requested not in SPLITS:
        raise DataError(f"--split {requested!r} is not a split; use one of {', '.join(SPLITS)}")
    if requested != "train" and not split_defined(cfg, requested):
        defined = [s for s in SPLITS if s == "train" or split_defined(cfg, s)]
        raise DataError(f"the data layout defines no {requested} split (it has {', '.join(defined)}); "
                        f"use --split {defined[-1]}")
    return requested, ""


class PixelFormatCheck:
    """One pixel format for the whole dataset, and one that fits ``data.max_pixel_value``.

    A 16-bit file among 8-bit ones, or values above the scale, would otherwise be divided by the
    wrong number silently (a lesion set once lost three quarters of its lesion pixels that way).
    """

    def __init__(self, data: DataConfig) -> None:
        self.max_value = data.max_pixel_value
        self.dtype: str | None = None
        self.first: Path | None = None

    def problem(self, path: Path, image: np.ndarray, valid: np.ndarray | None = None) -> str | None:
        """What is wrong with this image's pixel format, or None; only `valid` pixels count."""
        dtype = str(image.dtype)
        if self.dtype is None:
            self.dtype, self.first = dtype, path
            if image.dtype.kind in "ui" and np.iinfo(image.dtype).max < self.max_value:
                full = np.iinfo(image.dtype).max
                return (f"image {path} is {dtype} (at most {full}) but data.max_pixel_value is {self.max_value:g}, "
                        f"so it would never reach full scale; set data.max_pixel_value: {full}")
        elif dtype != self.dtype:
            return (f"image {path} is {dtype} but {self.first} is {self.dtype}: mixed bit depths would be scaled "
                    f"alike and read wrong; convert {path.name} to {self.dtype} (or all files to one type)")
        values = image if valid is None else image[valid]
        peak = float(values.max()) if values.size else 0.0
        if peak > self.max_value:
            return (f"image {path} has values up to {peak:g}, above data.max_pixel_value {self.max_value:g}; "
                    "set data.max_pixel_value to the data's full scale (65535 for 16-bit) or rescale the file")
        return None


@dataclass(frozen=True)
class SharedImage:
    """One image in two splits: the same file, or another file with the same content."""

    splits: tuple[str, str]
    paths: tuple[Path, Path]

    def describe(self) -> str:
        """One sentence naming the file (or the two files with equal bytes) and the two splits it is in."""
        a, b = self.paths
        how = f"{a} is in both" if a.resolve() == b.resolve() else f"{a} and {b} are the same image, in"
        return f"{how} the {self.splits[0]} and {self.splits[1]} splits"


def images_in_several_splits(splits: dict[str, list[Sample]]) -> list[SharedImage]:
    """Images that appear in more than one split (leakage), compared by content: the sha256 of the
    file's bytes, computed only for files whose size occurs in two splits (equal content has equal
    size). Equal keys of different files (``img/train/t000.tif``, ``img/val/t000.tif``) are not a
    leak; a copy under another name is. One entry per (image, later split), in split order."""
    from segdeploy.utils import file_sha256

    sizes: dict[int, set[str]] = {}
    for name, samples in splits.items():
        for s in samples:
            sizes.setdefault(s.image.stat().st_size, set()).add(name)
    first: dict[str, tuple[str, Path]] = {}
    found: list[SharedImage] = []
    for name, samples in splits.items():
        for s in samples:
            if len(sizes[s.image.stat().st_size]) < 2:
                continue
            digest = file_sha256(s.image)
            seen = first.setdefault(digest, (name, s.image))
            if seen[0] != name:
                found.append(SharedImage((seen[0], name), (seen[1], s.image)))
    return found


def leak_message(shared: list[SharedImage]) -> str:
    """One line naming the first shared image, its two splits and how many there are."""
    pair = shared[0].splits
    scored = "training" if "train" in pair else f"the {pair[0]} split"
    return (f"{shared[0].describe()} ({len(shared)} such image{'s' if len(shared) > 1 else ''} in all): a score on the "
            f"{pair[1]} split over images that {scored} also holds means nothing; "
            "remove them from one split (fix the split lists or folders)")


@dataclass
class LoadedSample:
    """One decoded pair, as every verb sees it.

    `image`: H×W×B in the file's dtype, invalid pixels as stored (NaN, the nodata value, …);
    `mask`: H×W class indices, ``ignore_index`` wherever the image is invalid (never scored,
    never trained on); `valid`: H×W bool, None when every pixel is valid; `nonfinite`: NaN/±Inf
    pixels that nothing declared invalid (invalid all the same; `data inspect` names the file).
    """

    image: np.ndarray
    mask: np.ndarray
    valid: np.ndarray | None
    nonfinite: int = 0

    @property
    def nbytes(self) -> int:
        """Bytes the decoded image, mask and validity hold in memory (what SampleCache counts)."""
        return self.image.nbytes + self.mask.nbytes + (0 if self.valid is None else self.valid.nbytes)


class SampleCache:
    """Decoded samples kept in memory up to `limit` bytes in all, shared by the readers given it
    (training and validation). The first samples read stay; the rest are decoded on every read:
    training visits every sample each epoch in a shuffled order, where an evicting cache would only
    churn. `data.cache` sets the limit (`DataConfig.cache_bytes`)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.nbytes = 0
        self._items: dict[tuple[Path, Path], LoadedSample] = {}
        self.left_out: set[tuple[Path, Path]] = set()  # samples read that did not fit

    def get(self, sample: Sample) -> LoadedSample | None:
        """The decoded sample kept for `sample`, or None when it was not kept."""
        return self._items.get((sample.image, sample.mask))

    def put(self, sample: Sample, loaded: LoadedSample) -> None:
        """Keep `loaded` when it fits under the limit; otherwise note it in `left_out` (it is decoded again each
        read)."""
        key = (sample.image, sample.mask)
        if self.nbytes + loaded.nbytes > self.limit:
            self.left_out.add(key)
            return
        self._items[key] = loaded
        self.nbytes += loaded.nbytes

    def describe(self) -> str:
        """What the cache holds, in one line."""
        held, total = len(self._items), len(self._items) + len(self.left_out)
        rest = f"; the other {total - held} are decoded again every epoch" if total > held else ""
        return (f"data cache: {held} of {total} samples read so far ({self.nbytes / 2**20:.0f} MB of the "
                f"{self.limit / 2**20:.0f} MB data.cache limit){rest}")


class SampleReader:
    """A split's samples read as numpy through the one decoder (`data.decode`): `sample` gives the
    `LoadedSample` (image, mask with invalid pixels as ignore_index, validity), `load` its
    (image, mask), `item` the model's normalised float32 B×H×W input (invalid pixels exactly 0,
    the training mean) and the int64 mask. Eval and parity need no more (and no torch); training
    wraps it in `torchdata.SegmentationDataset` for augmentation. Decoded samples are kept only in
    the `cache` it is given (training's), so eval holds one image at a time."""

    def __init__(self, samples: list[Sample], data: DataConfig, classes: ClassesConfig, mean: list[float],
                 std: list[float], cache: SampleCache | None = None) -> None:
        self.samples = samples
        self.data = data
        self.classes = classes
        self.set_normalization(mean, std)
        self.cache = cache

    def __len__(self) -> int:
        return len(self.samples)

    def sample(self, i: int) -> LoadedSample:
        """The decoded pair `i` (kept in the reader's cache, when it has one and there is room)."""
        s = self.samples[i]
        if self.cache is not None and (held := self.cache.get(s)) is not None:
            return held
        image, valid, source = self._read_image(s.image)
        raw = read_mask(s.mask, colours=self.data.mask_encoding == "palette")
        mask = decode_mask(raw, s.mask, self.data.mask_encoding, self.classes.num_classes,
                           self.classes.ignore_index, self.classes.palette)
        if image.shape[:2] != mask.shape[:2]:
            raise DataError(_size_mismatch(s, image, mask, source))
        if valid is not None:
            mask[~valid] = self.classes.ignore_index
        mask = mask.astype(np.uint8 if mask.max() < 256 else np.int64)
        loaded = LoadedSample(image, mask, valid, source.nonfinite)
        if self.cache is not None:
            self.cache.put(s, loaded)
        return loaded

    def _read_image(self, path: Path) -> tuple[np.ndarray, np.ndarray | None, ImageSource]:
        try:
            with open_image(path, self.data.bands) as source:
                image, valid = source.read()
        except BandCountError as exc:
            raise DataError(_band_fix(exc, self.data)) from None
        return image, None if valid.all() else valid, source

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw image (H×W×B, file dtype) and decoded mask (H×W; ignore_index where the image is invalid)."""
        s = self.sample(i)
        return s.image, s.mask

    def set_normalization(self, mean: list[float], std: list[float]) -> None:
        """Use these per-band mean and std (after division by data.max_pixel_value) from now on."""
        self.mean_values, self.std_values = list(mean), list(std)

    def item(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample `i` as the model's input: (B×H×W float32, normalised by `tiling.normalize`, invalid pixels exactly
        0; H×W int64 mask, ignore_index where the image is invalid)."""
        s = self.sample(i)
        x = normalize(s.image.transpose(2, 0, 1), self.data.max_pixel_value, self.mean_values, self.std_values,
                      valid=s.valid)
        return x, s.mask.astype(np.int64)


def _band_fix(exc: BandCountError, data: DataConfig) -> str:
    """The refusal of an image whose bands do not fit data.bands, with the override that trains on them."""
    n = len(exc.colour)
    stats = "" if data.mean == "auto" and data.std == "auto" else " data.mean=auto data.std=auto"
    return (f"image {exc.path} has {n} band{'s' if n != 1 else ''} but the recipe says data.bands={exc.bands}; "
            f"train on its bands with --set data.bands={n}{stats} (or convert the images)")


def _size_mismatch(s: Sample, image: np.ndarray, mask: np.ndarray, source: ImageSource) -> str:
    h, w = image.shape[:2]
    msg = f"image {s.image} is {w}×{h} but mask {s.mask} is {mask.shape[1]}×{mask.shape[0]}"
    if source.orientation != 1 and mask.shape[:2] == source.stored_size:
        return (f"{msg}, the image's size as stored: its EXIF orientation {source.orientation} "
                f"({ORIENTATIONS[source.orientation]}) shows it as {w}×{h}, and masks are read as their image is "
                "displayed (as labelling tools draw them); export the mask from the displayed image")
    return f"{msg}; they must match"


def class_pixel_counts(dataset: SampleReader) -> np.ndarray:
    """Pixels of each class over the reader's whole split (int64, length num_classes; ignore_index and out-of-range
    values not counted). Decodes every mask once."""
    counts = np.zeros(dataset.classes.num_classes, dtype=np.int64)
    for i in range(len(dataset)):
        mask = dataset.load(i)[1]
        counts += np.bincount(mask[mask < dataset.classes.num_classes].ravel(), minlength=len(counts))[: len(counts)]
    return counts


def suggested_class_weights(counts: np.ndarray) -> list[float]:
    """Median-frequency balancing: w_c = median(freq) / freq_c, absent classes get 0."""
    freq = counts / max(counts.sum(), 1)
    present = freq > 0
    if not present.any():
        return [1.0] * len(counts)
    med = float(np.median(freq[present]))
    return [round(float(med / f), 4) if f > 0 else 0.0 for f in freq]
