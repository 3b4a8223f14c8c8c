"""What makes a training run repeat: every random stream derived from `train.seed`, and PyTorch's
documented determinism switches (`train.deterministic`).

Where the streams come from (each a pure function of the seed, so a resumed run draws exactly what
an uninterrupted one would):

- the model's initial weights: `seed_everything(seed)` right before the model is built;
- epoch E's shuffle order: a generator seeded with `epoch_seed(seed, E)` (`SeededSampler`);
- sample i's augmentation in epoch E: `sample_seed(seed, E, i)`, drawn where the sample is read
  (in a loader worker or not), so the number of loader workers does not change it;
- the training step's own randomness (dropout, …): the global generators reseeded with
  `epoch_seed(seed, E)` at the start of each epoch.

On CPU this gives bit-identical weights for the same recipe, seed, data, library versions and
thread count (`tests/test_workflow.py` trains twice and compares every tensor). On CUDA, kernels
may still choose non-deterministic algorithms unless `train.deterministic` is set; then PyTorch
uses deterministic ones where it has them and each op that has none is reported (see
`deterministic_mode`); see https://pytorch.org/docs/stable/notes/randomness.html.
"""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

# cuBLAS needs a fixed workspace to be deterministic (CUDA >= 10.2): the PyTorch randomness notes
CUBLAS_WORKSPACE = ":4096:8"


def epoch_seed(seed: int, epoch: int) -> int:
    """A 32-bit seed for epoch `epoch` of a run seeded `seed` (numpy's SeedSequence mixing: nearby
    seeds and epochs give unrelated streams)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed for sample `index` of epoch `epoch`: its augmentation draws."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and PyTorch's global generators (CPU and every CUDA device)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


@dataclass
class Determinism:
    """What `deterministic_mode` found: the ops PyTorch ran without a deterministic implementation."""

    enabled: bool
    nondeterministic_ops: list[str] = field(default_factory=list)


@contextmanager
def deterministic_mode(enabled: bool) -> Iterator[Determinism]:
    """Within the block, PyTorch's documented switches for repeatable runs:
    `torch.use_deterministic_algorithms(True, warn_only=True)`, `cudnn.deterministic = True`,
    `cudnn.benchmark = False` and `CUBLAS_WORKSPACE_CONFIG=:4096:8` (unless already set). An op
    with no deterministic implementation (on CUDA e.g. `nll_loss2d`, the backward of bilinear
    `interpolate`) warns instead of failing; its name is collected in `.nondeterministic_ops`, since
    such a run may still differ between repeats. Everything is restored afterwards. With
    `enabled` False nothing changes."""
    state = Determinism(enabled)
    if not enabled:
        yield state
        return
    import torch

    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield state
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
        if saved[4] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        state.nondeterministic_ops = _nondeterministic_ops(caught)


def _nondeterministic_ops(caught: list[warnings.WarningMessage]) -> list[str]:
    """The op names in PyTorch's "… does not have a deterministic implementation" warnings; every
    other warning is shown again as it would have been."""
    ops: list[str] = []
    for w in caught:
        text = str(w.message)
        if "does not have a deterministic implementation" in text:
            name = text.split(" does not have")[0].strip()
            if name not in ops:
                ops.append(name)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return ops
