"""Model catalogue: every segmentation-models-pytorch architecture (with any smp encoder or any
timm encoder as ``tu-<name>``), SegNet with pooling indices, a strided-conv U-Net, and a ViT
segmenter on a timm backbone.

Every architecture is registered once, with what the rest of segdeploy needs to know about it
(`Architecture`: input divisor, static size, minimum tile, what ``model.encoder`` names, export
rewrites), the way timm registers a model with its pretrained config. Its builder takes
(ModelConfig, bands, num_classes) — bands: input channels, the recipe's data.bands (smp and timm
call it in_channels / in_chans) — and returns an nn.Module mapping a float32 N×B×H×W batch to
N×C×H×W logits; H and W must be multiples of ``facts(cfg, model).input_divisor``. Adding an
architecture is one `register_architecture` call here; nothing else probes a model's attributes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from segdeploy.artifact import MODEL_FORMATS, Run, check_source
from segdeploy.errors import ArtifactError, ModelError
from segdeploy.recipe import ModelConfig
from segdeploy.registry import Registry, did_you_mean

Builder = Callable[[ModelConfig, int, int], nn.Module]
Fact = Callable[[nn.Module], int]


@dataclass(frozen=True)
class ArchFacts:
    """What an architecture, as built, requires of its input.

    input_divisor: H and W must be multiples of it (px). static_size: the one H = W it accepts, or
    None. min_tile: the smallest H = W (a multiple of the divisor) at which a batch-2 forward and
    backward pass works, as registered; `check_tile_size` verifies it before suggesting it."""

    input_divisor: int
    static_size: int | None
    min_tile: int


@dataclass(frozen=True)
class Architecture:
    """A catalogue entry: the builder and the facts the rest of segdeploy needs (timm's
    ``register_model`` + pretrained cfg is the model). Every fact is required: an architecture
    registered without one fails at import, never defaults to 32.

    encoder: what ``model.encoder`` names for it: "smp" (an smp encoder or ``tu-<timm name>``),
    "timm" (a timm backbone, no prefix) or "none" (ignored). export_rewrite: applied to a copy of the
    model before ONNX export; returns (construct, where, action) for each rewrite it made."""

    name: str
    build: Builder
    encoder: Literal["smp", "timm", "none"]
    input_divisor: Fact
    min_tile: Fact
    static_size: Callable[[nn.Module], int | None]
    export_rewrite: Callable[[nn.Module], list[tuple[str, str, str]]] | None = None

    def facts(self, model: nn.Module) -> ArchFacts:
        """The registered facts evaluated on `model` as built (its encoder and kwargs decide the divisor): an
        ArchFacts."""
        divisor = int(self.input_divisor(model))
        static = self.static_size(model)
        return ArchFacts(divisor, None if static is None else int(static), int(self.min_tile(model)))


ARCHITECTURES: Registry[Architecture] = Registry("architecture")


def register_architecture(name: str, *, encoder: Literal["smp", "timm", "none"], input_divisor: Fact, min_tile: Fact,
                          static_size: Callable[[nn.Module], int | None],
                          export_rewrite: Callable[[nn.Module], list[tuple[str, str, str]]] | None = None,
                          ) -> Callable[[Builder], Builder]:
    """Decorator registering a builder under `name` with its facts (see `Architecture`)."""

    def deco(build: Builder) -> Builder:
        ARCHITECTURES.add(name, Architecture(name, build, encoder, input_divisor, min_tile, static_size, export_rewrite))
        return build

    return deco


# ----------------------------------------------------------------------------- smp architectures


def _smp_builder(arch: str) -> Builder:
    def build(cfg: ModelConfig, bands: int, num_classes: int) -> nn.Module:
        import segmentation_models_pytorch as smp

        check_encoder_name(cfg.encoder)
        weights = "imagenet" if cfg.weights == "imagenet" else None
        try:
            model = smp.create_model(
                arch, encoder_name=cfg.encoder, encoder_weights=weights, in_channels=bands,
                classes=num_classes, **cfg.kwargs,
            )
        except TypeError as exc:
            raise ModelError(f"model.kwargs do not fit {arch}: {exc}") from None
        except (OSError, ConnectionError) as exc:
            raise _offline_error(cfg.encoder, exc) from None
        except Exception as exc:
            if _looks_like_download_failure(exc):
                raise _offline_error(cfg.encoder, exc) from None
            raise
        return model

    return build


# smp 0.6 facts (segmentation_models_pytorch/base/model.py, encoders/_base.py): every encoder reports
# `output_stride` = min(its stride, 2**depth), dilation included, and `check_input_shape` refuses sizes
# that are not multiples of it wherever `requires_divisible_input_shape` is True (all but Unet, whose
# decoder interpolates; segdeploy pads Unet's input to the stride too, so feature maps align as in
# training). What smp does not declare is measured and written here, per architecture, as multiples
# of that stride: (input divisor, smallest tile). tests/test_models_losses.py re-measures them.
SMP_FACTS: dict[str, tuple[int, int]] = {
    "unet": (1, 1), "unetplusplus": (1, 1), "manet": (1, 1), "linknet": (1, 1), "fpn": (1, 1),
    "pspnet": (1, 1), "deeplabv3": (1, 1), "deeplabv3plus": (1, 1), "upernet": (1, 1), "segformer": (1, 1),
    # PAN's feature pyramid attention pools the deepest map three times by 2 and then convolves a 1-px
    # map: it needs ≥ 8 px there (96² at stride 16 fails with "Output size is too small")
    "pan": (1, 8),
    # DPT's last reassemble stage halves the stride-16 map and its fusion doubles it back: odd maps fail
    "dpt": (2, 2),
}
# a stage that needs more pixels than the stride says: mit (SegFormer's encoder) reduces keys by an 8×8
# convolution at stride 4 in its first stage, so it needs ≥ 32 px whatever the depth
SMP_ENCODER_MIN_TILE = {"MixVisionTransformerEncoder": 32}


def any_size(model: nn.Module) -> None:
    """The static-size fact of an architecture that accepts any multiple of its divisor."""
    return None


def _smp_stride(model: nn.Module) -> int:
    return int(model.encoder.output_stride)  # smp's own property on every encoder (no default)


def _smp_min_tile(arch: str) -> Fact:
    def fact(model: nn.Module) -> int:
        stride = _smp_stride(model)
        return max(SMP_FACTS[arch][1] * stride, SMP_ENCODER_MIN_TILE.get(type(model.encoder).__name__, 0))

    return fact


def _register_smp() -> None:
    """Every smp architecture whose facts are known; one smp adds later stays unregistered (an
    unknown model.arch), and a test fails until its facts are written into SMP_FACTS."""
    import segmentation_models_pytorch as smp

    for arch in smp.MODEL_ARCHITECTURES_MAPPING:
        if arch in SMP_FACTS:
            register_architecture(arch, encoder="smp", input_divisor=lambda m, k=SMP_FACTS[arch][0]: k * _smp_stride(m),
                                  min_tile=_smp_min_tile(arch), static_size=any_size)(_smp_builder(arch))


def check_encoder_name(name: str) -> None:
    """Refuse an unknown encoder before anything is built: a `tu-<name>` must be a timm model, any other name an smp
    encoder. Raises ModelError with the closest names."""
    if name.startswith("tu-"):
        import timm

        base = name[3:]
        if not timm.is_model(base):
            raise ModelError(
                f"unknown timm encoder {base!r} in model.encoder{did_you_mean(base, timm.list_models())}"
            )
        return
    import segmentation_models_pytorch as smp

    names = smp.encoders.get_encoder_names()
    if name not in names:
        raise ModelError(
            f"unknown encoder {name!r} in model.encoder{did_you_mean(name, names)}; "
            "any timm model works as 'tu-<name>'"
        )


def _looks_like_download_failure(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(w in text for w in ("connect", "offline", "resolve", "urlopen", "hub", "network", "timed out",
                                   "localentrynotfound", "cannot find the requested files"))


HUB_HOST = ("huggingface.co", 443)


def hub_reachable(timeout: float = 3.0) -> bool:
    """One short connection attempt to the weights hub (no retries)."""
    import socket

    try:
        socket.create_connection(HUB_HOST, timeout=timeout).close()
        return True
    except OSError:
        return False


@contextmanager
def fail_fast_when_offline(weights: str | None = "imagenet") -> Iterator[None]:
    """Downloading from the hub (`imagenet` weights; with no argument, any hub download such as
    an smp model by Hub id) with no network otherwise retries for ~45 s. When the hub
    does not answer one short connection attempt, switch the hub client to offline mode (weights
    already in its cache still load) and give urllib-based downloads a short timeout."""
    import os
    import socket

    if weights != "imagenet" or os.environ.get("HF_HUB_OFFLINE") or hub_reachable():
        yield
        return
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - timm/smp depend on it
        constants = None
    saved = constants.HF_HUB_OFFLINE if constants is not None else None
    old_timeout = socket.getdefaulttimeout()
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    socket.setdefaulttimeout(3.0)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old_timeout)
        if constants is not None:
            constants.HF_HUB_OFFLINE = saved


def _offline_error(encoder: str, exc: BaseException) -> ModelError:
    return ModelError(
        f"could not download imagenet weights for encoder {encoder!r} ({type(exc).__name__}); "
        "offline? set model.weights: null to train from scratch (--set model.weights=null), or download them "
        "once elsewhere and set model.weights: /path/to/encoder.safetensors (or .pth)"
    )


# ----------------------------------------------------------------------------- custom architectures


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SegNet(nn.Module):
    """SegNet (Badrinarayanan et al.): the decoder upsamples with the encoder's max-pool indices."""

    def __init__(self, bands: int, num_classes: int, widths: tuple[int, ...] = (64, 128, 256, 512, 512),
                 convs: int = 2) -> None:
        super().__init__()
        self.enc = nn.ModuleList()
        self.dec = nn.ModuleList()
        cin = bands
        for w in widths:
            self.enc.append(nn.Sequential(*[_conv_bn_relu(cin if i == 0 else w, w) for i in range(convs)]))
            cin = w
        outs = list(widths[-2::-1]) + [widths[0]]
        for w, wo in zip(widths[::-1], outs, strict=True):
            self.dec.append(nn.Sequential(*[_conv_bn_relu(w, w if i < convs - 1 else wo) for i in range(convs)]))
        self.pool = nn.MaxPool2d(2, 2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2, 2)
        self.head = nn.Conv2d(widths[0], num_classes, 3, padding=1)
        self.input_divisor = 2 ** len(widths)

    # With `export_friendly`, pooling indices become a one-hot over each 2×2 window (first maximum,
    # exactly like MaxPool2d's indices) and unpooling multiplies by it. Same numbers, but only
    # Reshape/ArgMax/Equal/Mul in ONNX: TensorRT has no MaxUnpool and no MaxPool indices output.
    export_friendly = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """N×B×H×W float32 -> N×C×H×W logits (H, W multiples of 2^len(widths))."""
        if self.export_friendly:
            return self._forward_onehot(x)
        indices = []
        for block in self.enc:
            x, idx = self.pool(block(x))
            indices.append(idx)
        for block, idx in zip(self.dec, reversed(indices), strict=True):
            x = block(self.unpool(x, idx))
        return self.head(x)

    def _forward_onehot(self, x: torch.Tensor) -> torch.Tensor:
        switches = []
        for block in self.enc:
            x = block(x)
            n, c, h, w = x.shape
            win = x.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(n, c, h // 2, w // 2, 4)
            first = win.argmax(-1, keepdim=True)  # first maximum, as MaxPool2d picks
            onehot = (first == torch.arange(4, device=x.device)).to(x.dtype)
            switches.append(onehot)
            x = win.amax(-1)
        for block, onehot in zip(self.dec, reversed(switches), strict=True):
            n, c, h, w = x.shape
            up = (x.unsqueeze(-1) * onehot).reshape(n, c, h, w, 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(n, c, 2 * h, 2 * w)
            x = block(up)
        return self.head(x)


class StridedUNet(nn.Module):
    """U-Net whose encoder downsamples with stride-2 convolutions and whose decoder upsamples
    with transposed convolutions (no pooling, no interpolation)."""

    def __init__(self, bands: int, num_classes: int, widths: tuple[int, ...] = (32, 64, 128, 256, 512)) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv_bn_relu(bands, widths[0]), _conv_bn_relu(widths[0], widths[0]))
        self.down = nn.ModuleList(
            nn.Sequential(_conv_bn_relu(a, b, stride=2), _conv_bn_relu(b, b)) for a, b in zip(widths, widths[1:])
        )
        self.up = nn.ModuleList(nn.ConvTranspose2d(b, a, 2, stride=2) for a, b in zip(widths, widths[1:]))
        self.fuse = nn.ModuleList(
            nn.Sequential(_conv_bn_relu(2 * a, a), _conv_bn_relu(a, a)) for a in widths[:-1]
        )
        self.head = nn.Conv2d(widths[0], num_classes, 1)
        self.input_divisor = 2 ** (len(widths) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """N×B×H×W float32 -> N×C×H×W logits (H, W multiples of 2^(len(widths)-1))."""
        skips = [self.stem(x)]
        for d in self.down:
            skips.append(d(skips[-1]))
        x = skips.pop()
        for up, fuse in zip(reversed(self.up), reversed(self.fuse), strict=True):
            x = fuse(torch.cat([up(x), skips.pop()], 1))
        return self.head(x)


class ViTSegmenter(nn.Module):
    """Segmenter-style linear decoder on a timm ViT: patch tokens -> class logits -> upsample.

    The positional embedding is learnt for one input size (``img_size``), so exported models of
    this kind are static at that size.
    """

    def __init__(self, backbone: str, bands: int, num_classes: int, img_size: int, pretrained: bool) -> None:
        super().__init__()
        import timm

        self.backbone = timm.create_model(backbone, pretrained=pretrained, num_classes=0, in_chans=bands,
                                          img_size=img_size)
        self.patch = self.backbone.patch_embed.patch_size[0]
        self.prefix = getattr(self.backbone, "num_prefix_tokens", 1)
        dim = self.backbone.num_features
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.static_size = img_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """N×B×H×W float32 -> N×C×H×W logits: the patch tokens' class scores, bilinearly upsampled (H, W multiples of
        the patch size)."""
        n, _, h, w = x.shape
        tokens = self.backbone.forward_features(x)[:, self.prefix :]
        logits = self.head(self.norm(tokens))  # N × (h/p·w/p) × C
        gh, gw = h // self.patch, w // self.patch
        logits = logits.transpose(1, 2).reshape(n, -1, gh, gw)
        return F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)


class SigmoidAsTwoClasses(nn.Module):
    """A one-channel binary network (P(class 1) = sigmoid(z)) as two-class logits [0, z]:
    softmax([0, z]) = [1 - sigmoid(z), sigmoid(z)], so its probabilities and its argmax (z > 0)
    are exactly the network's. Its tensors are the network's under ``net.``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """N×B×H×W -> N×2×H×W logits [0, z] of the wrapped one-channel model's z (softmax gives [1 - σ(z), σ(z)])."""
        z = self.net(x)
        return torch.cat([torch.zeros_like(z), z], 1)

    @property
    def encoder(self) -> nn.Module | None:  # freeze_encoder and the weights loader look for it
        """The wrapped model's encoder (None when it has none), for encoder freezing and weights loading."""
        return getattr(self.net, "encoder", None)


class ExportedProgramModule(nn.Module):
    """A `torch.export` program's module (``ExportedProgram.module()``) as a plain nn.Module: that
    module refuses ``train()``/``eval()`` (it is always in the mode it was exported in), which
    every caller of a model uses; here they are no-ops."""

    def __init__(self, program_module: nn.Module) -> None:
        super().__init__()
        self.program = program_module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The program's output for N×B×H×W float32 input (logits-like, as the program computes them)."""
        return self.program(x)

    def train(self, mode: bool = True) -> ExportedProgramModule:  # noqa: ARG002 - fixed at export
        """A no-op returning self: a torch.export program's train/eval behaviour was fixed when it was exported."""
        return self


def wrap_output(net: nn.Module, cfg: ModelConfig) -> nn.Module:
    """The network as segdeploy runs it: `SigmoidAsTwoClasses` for ``model.output: sigmoid``."""
    return SigmoidAsTwoClasses(net) if cfg.output == "sigmoid" else net


def inner_network(model: nn.Module) -> nn.Module:
    """The network whose tensors a weights file holds (inside `wrap_output`'s wrapper)."""
    return model.net if isinstance(model, SigmoidAsTwoClasses) else model


def _widths_kwargs(cfg: ModelConfig) -> dict:
    kw = dict(cfg.kwargs)
    if "widths" in kw:
        kw["widths"] = tuple(kw["widths"])
    return kw


def _segnet_export_rewrite(model: nn.Module) -> list[tuple[str, str, str]]:
    """TensorRT has no MaxUnpool and no MaxPool indices output: switch to the exact one-hot form."""
    model.export_friendly = True
    return [("MaxPool indices + MaxUnpool (no TensorRT equivalent)", "model",
             "rewritten as first-max one-hot switches (exact)")]


@register_architecture("segnet", encoder="none", input_divisor=lambda m: m.input_divisor,
                       min_tile=lambda m: m.input_divisor,  # the deepest pooled map is 1 px
                       static_size=any_size, export_rewrite=_segnet_export_rewrite)
def _segnet(cfg: ModelConfig, bands: int, num_classes: int) -> nn.Module:
    return SegNet(bands, num_classes, **_widths_kwargs(cfg))


@register_architecture("unet_strided", encoder="none", input_divisor=lambda m: m.input_divisor,
                       min_tile=lambda m: m.input_divisor, static_size=any_size)
def _unet_strided(cfg: ModelConfig, bands: int, num_classes: int) -> nn.Module:
    return StridedUNet(bands, num_classes, **_widths_kwargs(cfg))


@register_architecture("vit_segmenter", encoder="timm", input_divisor=lambda m: m.patch,
                       min_tile=lambda m: m.static_size, static_size=lambda m: m.static_size)
def _vit(cfg: ModelConfig, bands: int, num_classes: int) -> nn.Module:
    import timm

    name = cfg.encoder.removeprefix("tu-")
    if not timm.is_model(name):
        raise ModelError(f"unknown timm ViT {name!r} in model.encoder{did_you_mean(name, timm.list_models('*vit*'))}")
    kw = dict(cfg.kwargs)
    img_size = int(kw.pop("img_size", 224))
    if kw:
        raise ModelError(f"model.kwargs {sorted(kw)} are not used by vit_segmenter (only img_size)")
    try:
        return ViTSegmenter(name, bands, num_classes, img_size, pretrained=cfg.weights == "imagenet")
    except Exception as exc:
        if cfg.weights == "imagenet" and _looks_like_download_failure(exc):
            raise _offline_error(cfg.encoder, exc) from None
        raise


_register_smp()


# ----------------------------------------------------------------------------- public entry points


def check_model_names(cfg: ModelConfig) -> None:
    """Fail fast on an unknown architecture or encoder name, before data or weights load."""
    arch = ARCHITECTURES.get(cfg.arch, where="model.arch")
    if arch.encoder == "smp":
        check_encoder_name(cfg.encoder)


def build_model(cfg: ModelConfig, bands: int, num_classes: int,
                log: Callable[[str], None] | None = None) -> nn.Module:
    """The recipe's model; with ``model.weights: FILE`` its tensors come from the file (a whole
    model, or an encoder; `log` is told which). ``model.output: sigmoid`` builds a one-channel
    network for two classes and wraps it (`SigmoidAsTwoClasses`). Raises UnknownNameError for an
    unknown model.arch, ModelError for bad kwargs, encoders, outputs or weights files."""
    arch = ARCHITECTURES.get(cfg.arch, where="model.arch")
    if cfg.output == "sigmoid" and num_classes != 2:
        raise ModelError(f"model.output: sigmoid is for two classes (one sigmoid channel); the recipe has {num_classes}")
    with fail_fast_when_offline(cfg.weights):
        net = arch.build(cfg, bands, 1 if cfg.output == "sigmoid" else num_classes)
    if cfg.weights not in (None, "imagenet"):
        note = load_weights_file(net, Path(cfg.weights), cfg, bands, num_classes)
        if log is not None:
            log(note)
    return wrap_output(net, cfg)


def load_run_model(run: Run) -> nn.Module:
    """A finished run's PyTorch model, in eval mode on the CPU: rebuilt from its recipe's
    architecture (`build_model`, no pretrained download) with its safetensors weights (no
    unpickling), or an imported TorchScript / torch.export archive loaded as it is (wrapped like a
    trained model's output, `wrap_output`). Maps float32 N×B×H×W to N×C×H×W logits.

    Raises ArtifactError for an unfinished run, a model whose imported source changed since
    (`artifact.check_source`), an imported ONNX model (it has no PyTorch model: use its FP32
    ONNX), weights that do not match the recipe's model, and an archive that cannot be loaded."""
    run.require_finished()
    meta, fmt = run.meta, run.model_format
    check_source(run.model_file, meta)
    if fmt == "onnx":
        raise ArtifactError(f"run {run.root} is an imported ONNX model: it has no PyTorch model; use its "
                            f"{run.export_path('fp32').relative_to(run.root)}")
    if fmt != "weights":
        return wrap_output(_load_archive(run.model_file, fmt), run.recipe.model).eval()
    model = build_model(run.recipe.model.model_copy(update={"weights": None}), meta.bands, meta.num_classes)
    state = run.load_weights()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ArtifactError(f"{run.weights} does not match the recipe's model ({len(missing)} missing, "
                            f"{len(unexpected)} unexpected tensors); retrain the run")
    return model.eval()


def _load_archive(path: Path, fmt: str) -> nn.Module:
    """An imported TorchScript archive (``torch.jit.load``) or torch.export program
    (``torch.export.load``, as a plain module) on the CPU; ArtifactError when it cannot be loaded."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice: TorchScript is what was imported
            if fmt == "torchscript":
                return torch.jit.load(str(path), map_location="cpu")
            return ExportedProgramModule(torch.export.load(str(path)).module())
    except Exception as exc:  # noqa: BLE001 - any failure is the file's
        raise ArtifactError(f"{path} cannot be loaded ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:160]}); import the model again") from None


def facts(cfg: ModelConfig, model: nn.Module) -> ArchFacts:
    """The registered facts of `cfg.arch` for this built model (its kwargs and encoder decide the
    divisor). Raises UnknownNameError for an unregistered architecture."""
    return ARCHITECTURES.get(cfg.arch, where="model.arch").facts(inner_network(model))


def export_rewrites(arch: str, model: nn.Module) -> list[tuple[str, str, str]]:
    """Apply the architecture's registered export rewrites to `model` in place (a copy: the rewritten
    model is for export only); (construct, where, action) per rewrite."""
    if arch in MODEL_FORMATS:  # an imported TorchScript/torch.export program: exported as it is
        return []
    rewrite = ARCHITECTURES.get(arch, where="the run's model_meta.arch").export_rewrite
    return rewrite(inner_network(model)) if rewrite is not None else []


def check_tile_size(cfg: ModelConfig, model: nn.Module, tile: int, bands: int) -> ArchFacts:
    """Refuse, before anything is written, a tile size (px) the model cannot train at: the static
    size and the divisor first, then one forward and backward pass of a random batch of 2 at
    `tile`² in training mode (2, because BatchNorm cannot train on one value per channel: a batch of
    1 would fail for that reason instead; `check_batch_of_one` asks that question). The model's
    buffers, gradients, mode and the global RNG are left as they were.

    Raises ModelError naming data.tile_size and the smallest size that works (the registered
    `min_tile`, verified by the same pass). Returns the architecture's facts."""
    f = facts(cfg, model)
    what = f"model.arch={cfg.arch}" + ("" if ARCHITECTURES.get(cfg.arch).encoder == "none" else f" ({cfg.encoder})")
    if f.static_size is not None and tile != f.static_size:
        raise ModelError(f"data.tile_size={tile} but {what} accepts only {f.static_size}×{f.static_size} inputs; "
                         f"set data.tile_size={f.static_size}")
    if tile % f.input_divisor:
        down = tile - tile % f.input_divisor
        fits = [n for n in (down, down + f.input_divisor) if n >= f.min_tile]
        raise ModelError(f"data.tile_size={tile} is not a multiple of {f.input_divisor}, the input divisor of {what}; "
                         f"set data.tile_size={' or '.join(map(str, fits))}")
    problem = _trial(model, tile, bands, 2)
    if problem:
        raise ModelError(f"{what} cannot train at data.tile_size={tile} ({problem}); "
                         f"{_smallest_working(model, f, tile, bands)}")
    return f


def check_batch_of_one(cfg: ModelConfig, model: nn.Module, tile: int, bands: int) -> None:
    """Refuse a model that cannot train on a batch of 1 (BatchNorm after global pooling: PSPNet,
    DeepLabV3, UPerNet) when the training loader would give one. Raises ModelError naming
    train.batch_size."""
    problem = _trial(model, tile, bands, 1)
    if problem:
        raise ModelError(f"model.arch={cfg.arch} cannot train on a batch of 1 ({problem}), and the training loader "
                         "would give one (train.batch_size 1, or one training sample per process); set "
                         "train.batch_size=2 or more, with at least 2 training samples per process")


def _smallest_working(model: nn.Module, f: ArchFacts, tile: int, bands: int, tries: int = 12) -> str:
    """'the smallest size it trains at is N: set data.tile_size=N', found from the registered
    minimum upward in steps of the divisor, each size verified by a forward+backward pass."""
    start, which = max(f.min_tile, f.input_divisor), "smallest"
    if start <= tile:  # the registered minimum is met: the failure is not (only) the size
        start, which = tile + f.input_divisor, "smallest larger"
    for size in range(start, start + tries * f.input_divisor, f.input_divisor):
        if not _trial(model, size, bands, 2):
            return f"the {which} size it trains at is {size}: set data.tile_size={size}"
    return (f"no size from {start} to {start + (tries - 1) * f.input_divisor} works either; "
            "check model.kwargs or choose another model.arch")


def _trial(model: nn.Module, size: int, bands: int, batch: int) -> str:
    """'' when a training-mode forward+backward of a random batch×bands×size×size input works,
    else the first line of the error. Leaves buffers (BatchNorm statistics), gradients, the mode
    and the RNG as they were."""
    device = next(model.parameters()).device
    saved = {name: b.detach().clone() for name, b in model.named_buffers()}
    was_training = model.training
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            model.train()
            out = model(torch.randn(batch, bands, size, size, device=device))
            out = out[0] if isinstance(out, (tuple, list)) else out
            out.float().mean().backward()
        return ""
    except (RuntimeError, ValueError, IndexError) as exc:
        if isinstance(exc, torch.OutOfMemoryError):
            raise
        return str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
    finally:
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(saved[name])
        model.train(was_training)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load tensors only: safetensors, or torch files with ``weights_only=True`` (no unpickling);
    the state dict found inside a training checkpoint (``state_dict``, ``model``, …)."""
    from segdeploy.checkpoint import read_state_dict as read

    return read(path).tensors


ENCODER_PREFIXES = ("encoder.", "backbone.", "module.", "model.", "_orig_mod.")


def load_weights_file(net: nn.Module, path: Path, cfg: ModelConfig, bands: int, num_classes: int) -> str:
    """Initialise `net` from ``model.weights``, strictly: a file that holds the whole model sets
    every tensor (decoder and head too); a file that holds an encoder sets every encoder tensor.
    Returns what was loaded, in words; raises ModelError (how many matched, the first missing and
    unexpected keys, the likely cause) when neither fits."""
    from segdeploy import checkpoint as ck

    if not Path(path).is_file():
        raise ModelError(f"weights file {path} not found; fix model.weights")
    state = ck.read_state_dict(Path(path)).tensors
    whole = ck.match_state_dict(state, net.state_dict())
    if whole.complete:
        net.load_state_dict(whole.loaded, strict=False)
        return (f"model.weights: {path.name} holds the whole model: all {whole.matched} tensors loaded (encoder, "
                f"decoder and head){'; ' + '; '.join(whole.notes()) if whole.notes() else ''}")
    encoder = getattr(net, "encoder", None) or getattr(net, "backbone", None)
    if encoder is not None:
        part = ck.match_state_dict(state, encoder.state_dict(), ENCODER_PREFIXES)
        if part.complete:
            encoder.load_state_dict(part.loaded, strict=False)
            return (f"model.weights: {path.name} holds an encoder: its {part.matched} tensors loaded into the "
                    f"{cfg.encoder} encoder; the decoder and head start random"
                    + "".join(f"; {n}" for n in part.notes()))
        if whole.matched == 0:  # an encoder's file, but not this encoder's
            cause = ck.guess_smp_encoder(state)
            raise ModelError(f"model.weights {path} does not fit the {cfg.encoder} encoder: {part.summary()}"
                             f"{'; likely cause: ' + cause if cause else ''}")
    cause = ck.likely_cause(whole, num_classes, bands, state, cfg.encoder)
    raise ModelError(f"model.weights {path} does not fit model.arch={cfg.arch} model.encoder={cfg.encoder}: "
                     f"{whole.summary()}{'; likely cause: ' + cause if cause else ''}")


def freeze_encoder(model: nn.Module, trainable_stages: int | None) -> list[nn.Module]:
    """Freeze the encoder except its last `trainable_stages` stages; returns the frozen modules
    (their BatchNorm layers must stay in eval mode while training)."""
    if trainable_stages is None:
        return []
    encoder = getattr(model, "encoder", None) or getattr(model, "backbone", None)
    if encoder is None:
        raise ModelError(f"model.trainable_encoder_stages needs an encoder; {type(model).__name__} has none")
    for p in encoder.parameters():
        p.requires_grad_(False)
    if trainable_stages > 0:
        stages = encoder.get_stages() if hasattr(encoder, "get_stages") else None
        if not stages:
            raise ModelError(f"{type(encoder).__name__} does not expose stages; use trainable_encoder_stages: null")
        ordered = [stages[k] for k in sorted(stages)] if isinstance(stages, dict) else list(stages)
        if trainable_stages > len(ordered):
            raise ModelError(
                f"model.trainable_encoder_stages={trainable_stages} but the encoder exposes only its last "
                f"{len(ordered)} stages; use ≤ {len(ordered)} or null (all)"
            )
        for stage in ordered[-trainable_stages:]:
            modules = stage if isinstance(stage, (list, tuple)) else [stage]
            for m in modules:
                for p in m.parameters():
                    p.requires_grad_(True)
    return [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and not any(p.requires_grad for p in m.parameters())]
