"""PyTorch checkpoints made elsewhere: read tensors safely, find the state dict inside, and match
it to a model strictly, saying why when it does not fit.

Reading never unpickles code: ``.safetensors`` through safetensors, anything else through
``torch.load(weights_only=True)``. A file that needs more (a whole pickled model) is refused in
one line that shows the two safe ways to save it, unless the caller passes ``trust_pickle`` (the
user's explicit ``--trust-pickle``); a checkpoint whose weights are plain tensors beside entries
that need classes (Lightning hyper-parameters) is read with those classes as inert placeholders.

Matching is strict: every tensor the model needs must come from the file with its shape. Key
prefixes that wrappers add (``module.`` DataParallel/DDP, ``model.`` Lightning, ``_orig_mod.``
torch.compile) are removed only where that makes more keys fit. Tensors outside every module
the model has (a loss's class weights, an auxiliary classification head) are dropped and named;
tensors inside one of its modules that the model lacks mean another architecture, and fail.
"""

from __future__ import annotations

import itertools
import re
import zipfile
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segdeploy.errors import ModelError

STATE_DICT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "net")  # where trainers nest the weights
WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")
OPTIONAL_SUFFIXES = ("num_batches_tracked",)  # BatchNorm's step counter: inference never reads it
SAFE_WAYS = ("save it safely with `torch.save(model.state_dict(), 'model.pth')` (a state dict) or "
             "`torch.jit.script(model).save('model.ts')` (TorchScript, no Python class needed)")


class PickleRefused(ModelError):
    """The file needs unpickling beyond tensors; loading it would run code from the file."""


def is_torchscript(path: Path) -> bool:
    """A `torch.jit.save` archive: a zip whose entries hold TorchScript code."""
    return _zip_has(path, lambda n: "/code/" in n or n.endswith("constants.pkl"))


def is_exported_program(path: Path) -> bool:
    """A `torch.export.save` archive (.pt2)."""
    return path.suffix == ".pt2" or _zip_has(path, lambda n: n.endswith("/archive_format") or "serialized_exported_program" in n)


def _zip_has(path: Path, pred: Callable[[str], bool]) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(pred(n) for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def read_object(path: Path, trust_pickle: bool = False, warn: Callable[[str], None] | None = None) -> Any:
    """The object a checkpoint file holds: a dict of tensors from safetensors, else what
    `torch.load(weights_only=True)` gives (nested dicts and lists of tensors and plain values).

    Raises `PickleRefused` (one line: the class the file needs and the two safe ways to save it)
    when unpickling would run code, unless `trust_pickle`; then `warn` is called and the file is
    loaded with `weights_only=False`. Raises `ModelError` for a missing or unreadable file."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file {path} not found")
    if is_torchscript(path) or is_exported_program(path):
        raise ModelError(f"{path} is a {'TorchScript' if is_torchscript(path) else 'torch.export'} archive, not a "
                         "state dict; make a run of it with `segdeploy import`")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure is the file's
        text = str(exc)
        if "Unsupported global" not in text and "weights_only" not in text.replace("weights_only=True", ""):
            raise ModelError(f"cannot read {path}: {type(exc).__name__}: {_first_line(text)}") from None
        needs = re.search(r"GLOBAL ([\w.]+)", text)
        what = f" (it needs the Python class {needs.group(1)})" if needs else ""
        if not trust_pickle and (held := _weights_beside_objects(path, warn)) is not None:
            return held
        if not trust_pickle:
            raise PickleRefused(f"{path} is a pickled Python object{what}, not plain tensors, and loading it would run "
                                f"code from the file; {SAFE_WAYS}, or pass --trust-pickle if you trust the file") from None
    if warn is not None:
        warn(f"--trust-pickle: unpickling {path}, which runs code from the file")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"cannot unpickle {path}: {type(exc).__name__}: {_first_line(str(exc))} (the classes it "
                         f"was saved with must be importable here); {SAFE_WAYS}") from None


class _Placeholder:
    """What an object of a class a checkpoint names (and segdeploy does not trust) is read as: its
    arguments and state kept as data, none of its code run."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _weights_beside_objects(path: Path, warn: Callable[[str], None] | None) -> Any:
    """A checkpoint whose weights are plain tensors beside entries that need Python classes (a
    Lightning checkpoint's hyper-parameters: argparse.Namespace, an OmegaConf config, a Path): read
    with `weights_only=True`, each such class replaced by an inert `_Placeholder` (torch's
    `safe_globals` stand-ins), so no code from the file runs. Returned only when a state dict of
    tensors is then found outside every placeholder (those entries are left out, and `warn` says
    so); None otherwise — a whole pickled model stays refused."""
    import torch

    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        stand_ins = [(type(n.rsplit(".", 1)[-1], (_Placeholder,), {}), n) for n in names]
        with torch.serialization.safe_globals(stand_ins):
            obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, Mapping):
            return None
        find_state_dict(obj, path)  # raises when no tensors are found outside the placeholders
    except Exception:  # noqa: BLE001 - anything else: the plain refusal
        return None
    if warn is not None:
        warn(f"{path.name}: entries that need Python classes ({', '.join(names[:3])}{' …' if len(names) > 3 else ''}) "
             "were read as inert placeholders, without running their code, and left out: only its tensors are used")
    return obj


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0][:200]


@dataclass
class StateDict:
    """The tensors of a checkpoint and where in the file they were (e.g. ``state_dict``)."""

    tensors: dict[str, Any]
    nested: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # non-tensor entries left out (epoch, hyper-parameters)

    @property
    def where(self) -> str:
        """Where in the checkpoint the state dict was found, as the subscripts to reach it (or 'the top level')."""
        return "".join(f"[{k!r}]" for k in self.nested) or "the top level"


def find_state_dict(obj: Any, path: Path) -> StateDict:
    """The state dict inside what a file held: nested under ``state_dict`` / ``model_state_dict`` /
    ``model`` / ``net`` (Lightning, common training scripts), or the mapping itself.

    Raises `ModelError` when there is no mapping with tensors in it."""
    import torch

    nested: list[str] = []
    while isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return StateDict(dict(obj), nested)
        key = next((k for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        obj, nested = obj[key], [*nested, key]
    if isinstance(obj, Mapping):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return StateDict(tensors, nested, sorted(str(k) for k in obj if k not in tensors))
        keys = ", ".join(map(str, list(obj)[:6]))
        raise ModelError(f"{path} holds no tensors at {StateDict({}, nested).where} (keys: {keys}); "
                         "pass a file saved with torch.save(model.state_dict(), ...)")
    raise ModelError(f"{path} holds a {type(obj).__name__}, not a state dict; pass a file saved with "
                     "torch.save(model.state_dict(), ...)")


def read_state_dict(path: Path, trust_pickle: bool = False, warn: Callable[[str], None] | None = None) -> StateDict:
    """`read_object` then `find_state_dict`; a whole pickled model (trusted) gives its state dict."""
    from torch import nn

    obj = read_object(path, trust_pickle, warn)
    if isinstance(obj, nn.Module):
        return StateDict(dict(obj.state_dict()))
    return find_state_dict(obj, path)


# ------------------------------------------------------------------------------------ matching


@dataclass
class Match:
    """How a file's tensors fit a model's: what loads, and what does not (model key names)."""

    loaded: dict[str, Any]  # model key -> tensor from the file
    expected: int  # tensors the model needs
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)  # file keys inside the model's modules it lacks
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)  # key, file, model
    dropped: list[str] = field(default_factory=list)  # file keys outside every module of the model
    stripped: list[str] = field(default_factory=list)  # wrapper prefixes removed, outermost first

    @property
    def complete(self) -> bool:
        """True when every model tensor was loaded and nothing was unexpected or of the wrong shape."""
        return not (self.missing or self.unexpected or self.mismatched)

    @property
    def matched(self) -> int:
        """How many model tensors were loaded (optional buffers such as BatchNorm's num_batches_tracked not counted)."""
        return len([k for k in self.loaded if not k.endswith(OPTIONAL_SUFFIXES)])

    def summary(self) -> str:
        """'120 of 150 tensors matched; first missing: …; first unexpected: …; first wrong shape: …'."""
        parts = [f"{self.matched} of {self.expected} tensors matched"]
        if self.missing:
            parts.append(f"first missing: {self.missing[0]}")
        if self.unexpected:
            parts.append(f"first unexpected: {self.unexpected[0]}")
        if self.mismatched:
            k, a, b = self.mismatched[0]
            parts.append(f"first wrong shape: {k} is {list(a)} in the file, {list(b)} in the model")
        return "; ".join(parts)

    def notes(self) -> list[str]:
        """What matching did that the user should know: wrapper prefixes removed, tensors left out (named)."""
        out = []
        if self.stripped:
            out.append(f"key prefix{'es' if len(self.stripped) > 1 else ''} {' + '.join(self.stripped)} removed "
                       "(wrappers: DataParallel, Lightning, torch.compile, a module attribute)")
        if self.dropped:
            out.append(f"{len(self.dropped)} tensor(s) outside the model left out: {', '.join(self.dropped[:3])}"
                       f"{' …' if len(self.dropped) > 3 else ''}")
        return out


def _strip(keys: list[str], chain: tuple[str, ...]) -> dict[str, str]:
    """new key -> file key, each prefix of `chain` removed in turn from the keys that have it."""
    out = {}
    for k in keys:
        new = k
        for p in chain:
            new = new.removeprefix(p)
        out.setdefault(new, k)
    return out


def _strip_all(key: str, prefixes: tuple[str, ...]) -> str:
    """`key` without any leading run of `prefixes`, in any order."""
    while (p := next((p for p in prefixes if key.startswith(p)), None)) is not None:
        key = key[len(p):]
    return key


def best_prefix_chain(keys: list[str], target: Mapping[str, Any],
                      prefixes: tuple[str, ...] = WRAPPER_PREFIXES) -> tuple[str, ...]:
    """The shortest sequence of wrapper prefixes (up to three) whose removal fits the most keys
    to `target`; () when removing none fits as many. Besides `prefixes`, the first name that most
    of the keys that do not fit share is tried (a LightningModule's ``self.net = smp.Unet(...)``
    saves ``net.encoder…``): it is removed, like the others, only where more keys then fit."""
    best, best_score = (), sum(k in target for k in keys)
    misfits = [_strip_all(k, prefixes) for k in keys if k not in target]
    firsts = Counter(k.split(".", 1)[0] + "." for k in misfits if "." in k)
    prefixes += tuple(p for p, n in firsts.most_common(2) if 2 * n >= len(misfits) and p not in prefixes)
    for n in (1, 2, 3):
        for chain in itertools.product(prefixes, repeat=n):
            if not any(k.startswith(chain[0]) for k in keys):
                continue
            score = sum(k in target for k in _strip(keys, chain))
            if score > best_score:
                best, best_score = chain, score
    return best


def match_state_dict(state: Mapping[str, Any], target: Mapping[str, Any],
                     prefixes: tuple[str, ...] = WRAPPER_PREFIXES) -> Match:
    """Fit a file's tensors to a model's state dict (`target`: key -> tensor, or anything with
    ``.shape``). Every model tensor but BatchNorm's step counters must be there with its shape."""
    chain = best_prefix_chain(list(state), target, prefixes)
    renamed = _strip(list(state), chain)
    modules = {k.split(".")[0] for k in target}
    match = Match({}, sum(not k.endswith(OPTIONAL_SUFFIXES) for k in target), stripped=list(chain))
    for new, old in renamed.items():
        tensor = state[old]
        if new in target:
            want = tuple(target[new].shape)
            if tuple(tensor.shape) == want:
                match.loaded[new] = tensor
            else:
                match.mismatched.append((new, tuple(tensor.shape), want))
        elif new.split(".")[0] in modules:
            match.unexpected.append(new)
        else:
            match.dropped.append(old)
    shapes_off = {k for k, _, _ in match.mismatched}
    match.missing = [k for k in target if k not in match.loaded and k not in shapes_off
                     and not k.endswith(OPTIONAL_SUFFIXES)]
    return match


# ------------------------------------------------------------------------------------ why it does not fit


def likely_cause(match: Match, num_classes: int, bands: int, state: Mapping[str, Any] | None = None,
                 encoder_hint: str = "") -> str:
    """The most likely reason a file does not fit, in the user's words: the head's classes, the
    first convolution's bands, or the architecture the keys look like (smp's, by key names)."""
    heads_first = sorted(match.mismatched, key=lambda m: not any(w in m[0] for w in ("head", "classif", "logit", "final")))
    for key, got, want in heads_first:
        if len(got) >= 1 and len(got) == len(want) and got[1:] == want[1:] and want[0] in (num_classes, 1):
            hint = " (a one-channel sigmoid model: set model.output: sigmoid)" if got[0] == 1 and num_classes == 2 else ""
            return (f"the file's segmentation head has {got[0]} class{'es' if got[0] != 1 else ''}, the recipe has "
                    f"{num_classes} (classes.names){hint}")
    for key, got, want in match.mismatched:
        if len(got) == 4 and len(want) == 4 and want[1] == bands and got[1] != bands and got[0] == want[0]:
            return f"the file's first convolution takes {got[1]} bands, the recipe has {bands} (data.bands)"
    if state is not None and (match.missing or match.unexpected):
        guess = guess_smp_architecture({k: tuple(v.shape) for k, v in state.items()}, encoder_hint)
        if guess:
            return guess
        return ("the keys look like no segdeploy architecture; for a custom model, save it with "
                "`torch.jit.script(model).save('model.ts')` and import that")
    if match.mismatched:
        return "the architecture's sizes differ (encoder depth, decoder channels: see model.kwargs)"
    return ""


def guess_smp_architecture(shapes: Mapping[str, tuple[int, ...]], encoder_hint: str = "") -> str:
    """'keys look like a DeepLabV3Plus with a resnet50 encoder (model.arch: deeplabv3plus,
    model.encoder: resnet50)', from smp's own models built on the meta device (no memory, no
    weights), or '' when the keys are not an smp model's. Encoders are compared by key names and
    shapes (`encoder_hint`, the recipe's, first: when it fits, no other is built), decoders by key
    names (Jaccard similarity > 0.8)."""
    renamed = _strip(list(shapes), best_prefix_chain(list(shapes), _SmpKeys()))
    shapes = {new: shapes[old] for new, old in renamed.items()}
    if not any(k.startswith("encoder.") for k in shapes):
        return ""
    encoder = _guess_encoder({k[8:]: v for k, v in shapes.items() if k.startswith("encoder.")}, encoder_hint)
    arch = _guess_decoder({k for k in shapes if k.startswith("decoder.")}, encoder or "resnet34")
    if not arch and not encoder:
        return ""
    import segmentation_models_pytorch as smp

    name = smp.MODEL_ARCHITECTURES_MAPPING[arch].__name__ if arch else "segmentation model"
    settings = ", ".join(s for s in (f"model.arch: {arch}" if arch else "", f"model.encoder: {encoder}" if encoder else "") if s)
    enc = f" with a {encoder} encoder" if encoder else ""
    article = "an" if name[0] in "AEFIO" else "a"  # an FPN, a U-Net
    return f"keys look like {article} {name}{enc} (set {settings})"


def guess_smp_encoder(state: Mapping[str, Any]) -> str:
    """'keys look like a resnet34 encoder (set model.encoder: resnet34)' for an encoder's state
    dict (keys with or without an ``encoder.``-style prefix), '' when no smp encoder fits."""
    keys = list(state)
    for prefix in ("module.", "model.", "encoder.", "backbone."):
        if keys and all(k.startswith(prefix) for k in keys):
            keys = [k[len(prefix):] for k in keys]
    name = _guess_encoder({k: tuple(v.shape) for k, v in zip(keys, state.values(), strict=True)})
    return f"keys look like a {name} encoder (set model.encoder: {name})" if name else ""


class _SmpKeys(dict):
    """A pseudo target for prefix removal: any key under smp's top-level modules fits."""

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.split(".")[0] in ("encoder", "decoder", "segmentation_head")


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / max(len(a | b), 1)


def _guess_encoder(file_keys: Mapping[str, tuple[int, ...]], hint: str = "") -> str:
    """The smp encoder whose tensors (names and shapes) fit `file_keys` best, '' if none fits well."""
    import torch
    from segmentation_models_pytorch.encoders import encoders, get_encoder

    if hint in encoders:
        with torch.device("meta"):
            own = _encoder_keys(get_encoder, hint)
        if own is not None and set(own.items()) == set(file_keys.items()):
            return hint

    by_class: dict[Any, list[str]] = {}
    for name, spec in encoders.items():
        by_class.setdefault(spec["encoder"], []).append(name)
    top = {k.split(".")[0] for k in file_keys}
    best, best_score = "", 0.0
    with torch.device("meta"):
        for members in by_class.values():
            probe = _encoder_keys(get_encoder, members[0])
            if probe is None or _jaccard(top, {k.split(".")[0] for k in probe}) < 0.5:  # another family
                continue
            for name in members:
                own = probe if name == members[0] else _encoder_keys(get_encoder, name)
                if own is None:
                    continue
                score = _jaccard(set(file_keys.items()), set(own.items()))
                if score > best_score:
                    best, best_score = name, score
    return best if best_score > 0.9 else ""


def _encoder_keys(get_encoder: Callable[..., Any], name: str) -> dict[str, tuple[int, ...]] | None:
    try:
        enc = get_encoder(name, in_channels=3, depth=5, weights=None)
    except Exception:  # noqa: BLE001 - encoders that cannot be built on the meta device are skipped
        return None
    return {k: tuple(v.shape) for k, v in enc.state_dict().items()}


def _guess_decoder(file_keys: set[str], encoder: str) -> str:
    """The smp architecture whose decoder key names fit `file_keys` best ('' if none > 0.8)."""
    import warnings

    import segmentation_models_pytorch as smp
    import torch

    best, best_score = "", 0.0
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for arch in smp.MODEL_ARCHITECTURES_MAPPING:
            try:
                model = smp.create_model(arch, encoder_name=encoder, encoder_weights=None, classes=2)
            except Exception:  # noqa: BLE001 - e.g. DPT takes timm encoders only
                continue
            score = _jaccard(file_keys, {k for k in model.state_dict() if k.startswith("decoder.")})
            if score > best_score:
                best, best_score = arch, score
    return best if best_score > 0.8 else ""
