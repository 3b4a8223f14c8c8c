"""The PyTorch side of the data: augmentation (torchvision.transforms.v2, image and mask
together), the training Dataset over `dataset.SampleReader`, and band statistics."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from torchvision import tv_tensors
from torchvision.transforms import v2

from segdeploy.data.dataset import Sample, SampleCache, SampleReader
from segdeploy.recipe import AugmentConfig, ClassesConfig, DataConfig
from segdeploy.reproducible import epoch_seed, sample_seed
from segdeploy.tiling import normalize


class RandomRot90(v2.Transform):
    """Rotate image and mask together by the same random multiple of 90°."""

    def make_params(self, flat_inputs: list) -> dict:
        """A rotation by k × 90° for the whole sample (image and mask alike), k drawn uniformly from 0..3."""
        return {"k": int(torch.randint(4, ()))}

    def transform(self, inpt, params):  # type: ignore[override]
        """`inpt` (an image or mask tv_tensor) rotated by params['k'] × 90° in its last two axes; anything else as is."""
        if isinstance(inpt, tv_tensors.TVTensor):
            return tv_tensors.wrap(torch.rot90(inpt, params["k"], dims=(-2, -1)), like=inpt)
        return inpt


def build_augment(aug: AugmentConfig, tile: int, ignore_index: int, bands: int) -> v2.Compose:
    """The joint image/mask augmentation of the recipe's `augment` section as a torchvision v2 Compose: random crop to
    `tile` (padding with 0 and `ignore_index`), flips, 90° rotations and the brightness/contrast jitter (1- or
    3-band images only)."""
    ops: list[v2.Transform] = []
    if aug.crop:
        ops.append(v2.RandomCrop(tile, pad_if_needed=True, fill={tv_tensors.Image: 0.0, tv_tensors.Mask: ignore_index}))
    if aug.hflip:
        ops.append(v2.RandomHorizontalFlip(aug.hflip))
    if aug.vflip:
        ops.append(v2.RandomVerticalFlip(aug.vflip))
    if aug.rot90:
        ops.append(RandomRot90())
    if (aug.brightness or aug.contrast) and bands in (1, 3):
        ops.append(v2.ColorJitter(brightness=aug.brightness or None, contrast=aug.contrast or None))
    return v2.Compose(ops)


INVALID = -1  # in the mask while augmenting: "the image is invalid here" (an ignore_index pixel may be valid)


class SegmentationDataset(SampleReader, Dataset):
    """Yields (float32 B×H×W normalised image, int64 H×W mask) tensors, augmented when asked.

    Invalid pixels (see `data.decode`) are ignore_index in the mask and exactly 0 in the input (the
    training mean), after augmentation too: they are filled with the mean before it (so colour
    jitter never sees NaN or a nodata value) and travel through it as INVALID in the mask."""

    def __init__(self, samples: list[Sample], data: DataConfig, classes: ClassesConfig, mean: list[float],
                 std: list[float], augment: AugmentConfig | None = None, cache: SampleCache | None = None) -> None:
        super().__init__(samples, data, classes, mean, std, cache)
        self.transform = (
            build_augment(augment, data.tile_size, classes.ignore_index, data.bands) if augment else None
        )

    def to_tensor(self, image: np.ndarray) -> torch.Tensor:
        """An H×W×B image as a B×H×W float32 tensor divided by data.max_pixel_value (0..1 for in-range pixels)."""
        x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)).astype(np.float32))
        return x / self.data.max_pixel_value

    def normalize(self, x: torch.Tensor, valid: np.ndarray | None = None) -> torch.Tensor:
        """Already scaled to [0, 1] by `to_tensor` (augmentations work on that): tiling's normalize."""
        return torch.from_numpy(normalize(x.numpy(), 1.0, self.mean_values, self.std_values, valid))

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample `item`, or `(index, seed)` from a `SeededSampler`: then its augmentation is drawn
        from `seed` alone (the global generator is left as it was), so it is the same whichever
        loader worker reads it and whether the run was resumed."""
        i, seed = item if isinstance(item, tuple) else (item, None)
        s = self.sample(i)
        image, y = s.image, torch.from_numpy(s.mask.astype(np.int64))
        if s.valid is not None:
            fill = np.asarray(self.mean_values, np.float64) * self.data.max_pixel_value
            image = np.where(s.valid[..., None], image, fill.astype(image.dtype if image.dtype.kind == "f" else np.float64))
            y[torch.from_numpy(~s.valid)] = INVALID
        x = self.to_tensor(image)
        if self.transform is not None:
            with torch.random.fork_rng(devices=[], enabled=seed is not None):
                if seed is not None:
                    torch.manual_seed(seed)
                xi, ym = self.transform(tv_tensors.Image(x), tv_tensors.Mask(y))
            x, y = xi.as_subclass(torch.Tensor), ym.as_subclass(torch.Tensor)
        if s.valid is None:
            return self.normalize(x), y
        invalid = y == INVALID
        y[invalid] = self.classes.ignore_index
        return self.normalize(x, ~invalid.numpy()), y


class SeededSampler(Sampler):
    """Training order and per-sample augmentation seeds as pure functions of (seed, epoch): yields
    `(index, sample_seed(seed, epoch, index))`. Shuffled by a generator seeded with
    `epoch_seed(seed, epoch)`, or, under DDP, by `base` (a DistributedSampler, given the epoch).
    Call `set_epoch` before each epoch; a resumed run then draws what an uninterrupted one did."""

    def __init__(self, size: int, seed: int, base: Sampler | None = None) -> None:
        self.size, self.seed, self.base, self.epoch = size, seed, base, 0

    def set_epoch(self, epoch: int) -> None:
        """Use epoch `epoch`'s order and seeds (and pass it on to a wrapped DistributedSampler)."""
        self.epoch = epoch
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)  # type: ignore[union-attr]

    def order(self) -> list[int]:
        """This epoch's sample order: the wrapped sampler's, or a permutation seeded by (seed, epoch)."""
        if self.base is not None:
            return list(self.base)
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self):  # noqa: ANN204 - Iterator[tuple[int, int]]
        return iter([(i, sample_seed(self.seed, self.epoch, i)) for i in self.order()])

    def __len__(self) -> int:
        return len(self.base) if self.base is not None else self.size  # type: ignore[arg-type]


@dataclass(frozen=True)
class EpochPlan:
    """How much of the training split one epoch sees: `crops[i]` random tile² crops of image i
    (data.crops_per_image: "auto" = ceil(H·W / tile²), at least 1; 1 each without augment.crop,
    when the whole image is the sample), and the pixels they cover against the split's."""

    crops: list[int]
    tile: int
    setting: int | str
    pixels: int  # per epoch, counting only the part of each crop inside its image
    split_pixels: int

    @classmethod
    def of(cls, sizes: list[tuple[int, int]], tile: int, setting: int | str, cropping: bool) -> EpochPlan:
        """The plan for images of `sizes` ((H, W) each) at `tile` px with data.crops_per_image `setting` ("auto" or a
        count) when `cropping` (augment.crop) is on; one sample per image otherwise."""
        if not cropping:
            crops = [1] * len(sizes)
        elif setting == "auto":
            crops = [max(1, -(-h * w // (tile * tile))) for h, w in sizes]
        else:
            crops = [int(setting)] * len(sizes)
        seen = sum(n * (min(h, tile) * min(w, tile) if cropping else h * w) for n, (h, w) in zip(crops, sizes, strict=True))
        return cls(crops, tile, setting if cropping else "off (augment.crop: false)", seen, sum(h * w for h, w in sizes))

    def describe(self) -> str:
        """One line: crops, images, pixels per epoch and their share of the split's."""
        return (f"an epoch: {sum(self.crops)} samples from {len(self.crops)} training images (data.crops_per_image: "
                f"{self.setting}), {self.pixels / 1e6:.2f} MP = {self.pixels / max(self.split_pixels, 1):.0%} of the "
                "split's pixels")

    def record(self) -> dict:
        """What meta.json records about it."""
        return {"crops_per_image": self.setting, "train_samples_per_epoch": sum(self.crops),
                "train_pixels_per_epoch": self.pixels, "train_split_pixels": self.split_pixels}


class CropEpoch(Dataset):
    """An epoch of training samples: image i appears plan.crops[i] times, each time as a fresh
    random crop (the dataset's augmentation draws it), so large images are covered, not glimpsed."""

    def __init__(self, dataset: SegmentationDataset, plan: EpochPlan) -> None:
        self.dataset = dataset
        self.image_of = np.repeat(np.arange(len(plan.crops)), plan.crops)

    def __len__(self) -> int:
        return len(self.image_of)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Crop `item` of the epoch, or `(crop, seed)` from a `SeededSampler` (each crop its own seed)."""
        k, seed = item if isinstance(item, tuple) else (item, None)
        image = int(self.image_of[k])
        return self.dataset[(image, seed) if seed is not None else image]


def band_stats(dataset: SampleReader, limit: int = 256) -> tuple[list[float], list[float]]:
    """Per-band mean/std (in [0, 1] units after max_pixel_value) of the valid pixels of up to
    `limit` images (an invalid pixel's NaN or nodata value is no statistic of the data)."""
    bands = dataset.data.bands
    total, total_sq, count = np.zeros(bands), np.zeros(bands), 0
    for i in range(min(len(dataset), limit)):
        s = dataset.sample(i)
        x = s.image.reshape(-1, bands) if s.valid is None else s.image[s.valid]
        x = x.astype(np.float64) / dataset.data.max_pixel_value
        total += x.sum(0)
        total_sq += (x * x).sum(0)
        count += len(x)
    mean = total / max(count, 1)
    std = np.sqrt(np.maximum(total_sq / max(count, 1) - mean**2, 1e-12))
    return [round(float(v), 6) for v in mean], [round(max(float(v), 1e-6), 6) for v in std]
