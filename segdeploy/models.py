"""Model catalogue: every segmentation-models-pytorch architecture (with any smp encoder or any
timm encoder as ``tu-<name>``), SegNet with pooling indices, a strided-conv U-Net, and a ViT
segmenter on a timm backbone.

Every builder takes (ModelConfig, in_channels, num_classes) and returns an nn.Module mapping a
float32 N×B×H×W batch to N×C×H×W logits; H and W must be multiples of ``input_divisor(model)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from segdeploy.errors import ModelError
from segdeploy.recipe import ModelConfig
from segdeploy.registry import Registry, did_you_mean

Builder = Callable[[ModelConfig, int, int], nn.Module]
ARCHITECTURES: Registry[Builder] = Registry("architecture")


# ----------------------------------------------------------------------------- smp architectures


def _smp_builder(arch: str) -> Builder:
    def build(cfg: ModelConfig, in_channels: int, num_classes: int) -> nn.Module:
        import segmentation_models_pytorch as smp

        check_encoder_name(cfg.encoder)
        weights = "imagenet" if cfg.weights == "imagenet" else None
        try:
            model = smp.create_model(
                arch, encoder_name=cfg.encoder, encoder_weights=weights, in_channels=in_channels,
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


def _register_smp() -> None:
    import segmentation_models_pytorch as smp

    for arch in smp.MODEL_ARCHITECTURES_MAPPING:
        ARCHITECTURES.add(arch, _smp_builder(arch))


def check_encoder_name(name: str) -> None:
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

    def __init__(self, in_channels: int, num_classes: int, widths: tuple[int, ...] = (64, 128, 256, 512, 512),
                 convs: int = 2) -> None:
        super().__init__()
        self.enc = nn.ModuleList()
        self.dec = nn.ModuleList()
        cin = in_channels
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

    def __init__(self, in_channels: int, num_classes: int, widths: tuple[int, ...] = (32, 64, 128, 256, 512)) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv_bn_relu(in_channels, widths[0]), _conv_bn_relu(widths[0], widths[0]))
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

    def __init__(self, backbone: str, in_channels: int, num_classes: int, img_size: int, pretrained: bool) -> None:
        super().__init__()
        import timm

        self.backbone = timm.create_model(backbone, pretrained=pretrained, num_classes=0, in_chans=in_channels,
                                          img_size=img_size)
        self.patch = self.backbone.patch_embed.patch_size[0]
        self.prefix = getattr(self.backbone, "num_prefix_tokens", 1)
        dim = self.backbone.num_features
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.input_divisor = self.patch
        self.static_size = img_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
        z = self.net(x)
        return torch.cat([torch.zeros_like(z), z], 1)

    @property
    def encoder(self) -> nn.Module | None:  # freeze_encoder and the weights loader look for it
        return getattr(self.net, "encoder", None)

    @property
    def input_divisor(self) -> int:
        return input_divisor(self.net)

    @property
    def static_size(self) -> int | None:
        return static_size(self.net)


class ExportedProgramModule(nn.Module):
    """A `torch.export` program's module (``ExportedProgram.module()``) as a plain nn.Module: that
    module refuses ``train()``/``eval()`` (it is always in the mode it was exported in), which
    every caller of a model uses; here they are no-ops."""

    def __init__(self, program_module: nn.Module) -> None:
        super().__init__()
        self.program = program_module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)

    def train(self, mode: bool = True) -> ExportedProgramModule:  # noqa: ARG002 - fixed at export
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


@ARCHITECTURES.register("segnet")
def _segnet(cfg: ModelConfig, in_channels: int, num_classes: int) -> nn.Module:
    return SegNet(in_channels, num_classes, **_widths_kwargs(cfg))


@ARCHITECTURES.register("unet_strided")
def _unet_strided(cfg: ModelConfig, in_channels: int, num_classes: int) -> nn.Module:
    return StridedUNet(in_channels, num_classes, **_widths_kwargs(cfg))


@ARCHITECTURES.register("vit_segmenter")
def _vit(cfg: ModelConfig, in_channels: int, num_classes: int) -> nn.Module:
    import timm

    name = cfg.encoder.removeprefix("tu-")
    if not timm.is_model(name):
        raise ModelError(f"unknown timm ViT {name!r} in model.encoder{did_you_mean(name, timm.list_models('*vit*'))}")
    kw = dict(cfg.kwargs)
    img_size = int(kw.pop("img_size", 224))
    if kw:
        raise ModelError(f"model.kwargs {sorted(kw)} are not used by vit_segmenter (only img_size)")
    try:
        return ViTSegmenter(name, in_channels, num_classes, img_size, pretrained=cfg.weights == "imagenet")
    except Exception as exc:
        if cfg.weights == "imagenet" and _looks_like_download_failure(exc):
            raise _offline_error(cfg.encoder, exc) from None
        raise


_register_smp()


# ----------------------------------------------------------------------------- public entry points


def check_model_names(cfg: ModelConfig) -> None:
    """Fail fast on an unknown architecture or encoder name, before data or weights load."""
    ARCHITECTURES.get(cfg.arch, where="model.arch")
    if cfg.arch in ARCHITECTURES and cfg.arch not in ("segnet", "unet_strided", "vit_segmenter"):
        check_encoder_name(cfg.encoder)


def build_model(cfg: ModelConfig, in_channels: int, num_classes: int,
                log: Callable[[str], None] | None = None) -> nn.Module:
    """The recipe's model; with ``model.weights: FILE`` its tensors come from the file (a whole
    model, or an encoder; `log` is told which). ``model.output: sigmoid`` builds a one-channel
    network for two classes and wraps it (`SigmoidAsTwoClasses`)."""
    builder = ARCHITECTURES.get(cfg.arch, where="model.arch")
    if cfg.output == "sigmoid" and num_classes != 2:
        raise ModelError(f"model.output: sigmoid is for two classes (one sigmoid channel); the recipe has {num_classes}")
    with fail_fast_when_offline(cfg.weights):
        net = builder(cfg, in_channels, 1 if cfg.output == "sigmoid" else num_classes)
    if cfg.weights not in (None, "imagenet"):
        note = load_weights_file(net, Path(cfg.weights), cfg, in_channels, num_classes)
        if log is not None:
            log(note)
    return wrap_output(net, cfg)


def input_divisor(model: nn.Module) -> int:
    """Spatial sizes must be multiples of this (encoder output stride, patch size, …)."""
    if hasattr(model, "input_divisor"):
        return int(model.input_divisor)
    encoder = getattr(model, "encoder", None)
    if encoder is not None and hasattr(encoder, "output_stride"):
        return int(encoder.output_stride)
    return 32


def static_size(model: nn.Module) -> int | None:
    """The one input size the model accepts, or None when any multiple of the divisor works."""
    return getattr(model, "static_size", None)


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
