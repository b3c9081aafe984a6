"""Reverse Distillation (Deng & Li, CVPR 2022) as a pure nn.Module: a frozen encoder, a trainable one-class
bottleneck (OCBE) and a decoder that mirrors the encoder, residual block for residual block, and reconstructs its
multi-scale features from the bottleneck."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..components import BackboneError, FeatureExtractor
from ..components.distillation import StageDistanceModel


def conv_block(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def stride_steps(strides: Sequence[int]) -> list[int]:
    """log2 of each stage's stride relative to the first: the stages must be powers of two apart."""
    steps = [math.log2(s / strides[0]) for s in strides]
    if any(b <= a or not b.is_integer() for a, b in itertools.pairwise(steps)):
        raise BackboneError(
            f"Reverse Distillation needs stages whose strides are powers of two apart, each larger; got "
            f"{list(strides)}: choose other --model.layers"
        )
    return [int(s) for s in steps]


@dataclass(frozen=True)
class StageShape:
    """What the decoder mirrors of one encoder stage.

    Args:
        channels: the stage's output channels.
        blocks: its residual blocks.
        width: the inner width of a bottleneck block (the 3x3 convolution's channels), or None for the basic
            block of two 3x3 convolutions.
        rectified: the stage's output passes a ReLU (a ResNet's does; an EfficientNet's linear bottleneck does
            not, and its features take negative values that a decoder ending in a ReLU could not reconstruct).
    """

    channels: int
    blocks: int
    width: int | None
    rectified: bool = True


def stage_shapes(extractor: FeatureExtractor) -> list[StageShape]:
    """The chosen stages of `extractor`'s backbone: ResNets give their block count and, for bottleneck blocks
    (resnet50, wide_resnet50_2), the inner width, as the paper's de-ResNets mirror them. Other backbones (an
    EfficientNet's inverted residuals have no reversed form in the paper) get basic blocks, as many as the stage
    has blocks, at the stage's channels: the closest residual design."""
    shapes = []
    for info, channels in zip(extractor.model.feature_info.get_dicts(), extractor.channels, strict=True):
        stage = extractor.model.get_submodule(info["module"])
        blocks = list(stage) if isinstance(stage, nn.Sequential) else [stage]
        last = blocks[-1]
        width = last.conv2.out_channels if hasattr(last, "conv3") and hasattr(last, "conv2") else None
        resnet = hasattr(last, "conv2") and hasattr(last, "downsample")  # BasicBlock, Bottleneck: ReLU after the sum
        shapes.append(StageShape(channels, max(1, len(blocks)), width, rectified=resnet))
    return shapes


class ResidualBlock(nn.Module):
    """A ResNet block, forwards (`up` 1) or reversed (`up` 2: the paper's de-ResNet block, whose first
    spatial convolution and shortcut are 2x2 transposed convolutions of stride 2). Basic (two 3x3
    convolutions) when `width` is None, else a bottleneck (1x1 to `width`, 3x3, 1x1 out).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        width: the bottleneck's inner channels, or None for a basic block.
        stride: 2 halves the resolution (the bottleneck's one-class embedding), 1 keeps it.
        up: 2 doubles the resolution (the decoder), 1 keeps it.
        rectify: end in a ReLU, as a ResNet block does; false for a reconstruction that takes negative values.
    """

    def __init__(
        self, in_channels: int, out_channels: int, width: int | None, stride: int = 1, up: int = 1, rectify: bool = True
    ) -> None:
        super().__init__()
        self.rectify = rectify
        inner = out_channels if width is None else width

        def spatial(channels_in: int, channels_out: int) -> nn.Module:
            if up > 1:
                return nn.ConvTranspose2d(channels_in, channels_out, up, stride=up, bias=False)
            return nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1, bias=False)

        if width is None:
            layers = [spatial(in_channels, inner), nn.BatchNorm2d(inner), nn.ReLU(inplace=True)]
            layers += [nn.Conv2d(inner, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels)]
        else:
            layers = [nn.Conv2d(in_channels, inner, 1, bias=False), nn.BatchNorm2d(inner), nn.ReLU(inplace=True)]
            layers += [spatial(inner, inner), nn.BatchNorm2d(inner), nn.ReLU(inplace=True)]
            layers += [nn.Conv2d(inner, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)]
        self.body = nn.Sequential(*layers)
        nn.init.zeros_(layers[-1].weight)  # each block starts as its shortcut (Goyal et al. 2017): fast early training
        self.shortcut: nn.Module = nn.Identity()
        if up > 1:
            self.shortcut = nn.Sequential(
                nn.ConvTranspose2d(in_channels, out_channels, up, stride=up, bias=False), nn.BatchNorm2d(out_channels)
            )
        elif stride > 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        summed = self.body(x) + self.shortcut(x)
        return F.relu(summed) if self.rectify else summed


def residual_stage(in_channels: int, shape: StageShape, blocks: int, stride: int = 1, up: int = 1) -> nn.Sequential:
    """`blocks` residual blocks to `shape.channels`: the first changes channels and resolution, as ResNet's first
    block of a stage does; the last ends in a ReLU only if the stage it mirrors does (`shape.rectified`)."""
    ends = [shape.rectified if k == blocks - 1 else True for k in range(blocks)]
    first = ResidualBlock(in_channels, shape.channels, shape.width, stride, up, rectify=ends[0])
    rest = [ResidualBlock(shape.channels, shape.channels, shape.width, rectify=end) for end in ends[1:]]
    return nn.Sequential(first, *rest)


class OneClassBottleneck(nn.Module):
    """The paper's OCBE. Multi-scale fusion: each stage is brought to the last stage's resolution by stride-2
    conv blocks whose channels climb as the encoder's do (layer1 256 -> 512 -> 1024 in wide_resnet50_2); the
    concatenation goes through a residual stage of stride 2 to twice the last stage's channels: the one-class
    embedding, three blocks as in the paper (ResNet-50's layer4: bottlenecks to 2048 channels for
    wide_resnet50_2).

    Args:
        shapes: the encoder stages (`stage_shapes`).
        strides: their strides, powers of two apart.
    """

    def __init__(self, shapes: Sequence[StageShape], strides: Sequence[int]) -> None:
        super().__init__()
        steps, channels = stride_steps(strides), [s.channels for s in shapes]
        self.align = nn.ModuleList()
        for i, step in enumerate(steps):
            path, source = [], channels[i]
            for k in range(steps[-1] - step):  # one stride-2 block per octave, to the channels of the stage there
                target = channels[next(j for j, s in enumerate(steps) if s >= step + k + 1)]
                path.append(conv_block(source, target, 2))
                source = target
            self.align.append(nn.Sequential(*path))
        last = shapes[-1]
        embedding = StageShape(2 * last.channels, 3, None if last.width is None else 2 * last.width)
        self.embed = residual_stage(len(channels) * last.channels, embedding, embedding.blocks, stride=2)
        self.channels = embedding.channels

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        return self.embed(torch.cat([align(f) for align, f in zip(self.align, features, strict=True)], dim=1))


class Decoder(nn.Module):
    """The encoder reversed (the paper's de_wide_resnet50_2): from the embedding back up, last stage first, one
    residual stage per encoder stage at its channels and width, its first block upsampling by 2x2 transposed
    convolutions to the stage's stride. Block counts follow the paper's de-ResNet, which builds its stages with
    the encoder's counts in forward order: the first decoder stage (to the deepest encoder stage) has as many
    blocks as the first encoder stage (3, 4, 6 for wide_resnet50_2).

    Args:
        shapes: the encoder stages (`stage_shapes`).
        strides: their strides, powers of two apart.
        source_channels: the embedding's channels.
    """

    def __init__(self, shapes: Sequence[StageShape], strides: Sequence[int], source_channels: int) -> None:
        super().__init__()
        steps = stride_steps(strides)
        stages, source = [], source_channels
        targets = list(reversed(range(len(shapes))))
        for order, i in enumerate(targets):
            factor = 2 if i == targets[0] else 2 ** (steps[i + 1] - steps[i])
            stages.append(residual_stage(source, shapes[i], shapes[order].blocks, up=factor))
            source = shapes[i].channels
        self.stages = nn.ModuleList(stages)

    def forward(self, embedding: Tensor) -> list[Tensor]:
        """Reconstructions of the encoder's stages, first stage first."""
        outputs, x = [], embedding
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs[::-1]


class ReverseDistillationModel(StageDistanceModel):
    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[int | str] = (1, 2, 3),
        pretrained: bool = True,
        weights_path: str | Path | None = None,
        blur_sigma: float = 4.0,
    ) -> None:
        super().__init__()
        self.extractor = FeatureExtractor(backbone, layers, pretrained, weights_path, canonical_batch=None)
        shapes, strides = stage_shapes(self.extractor), self.extractor.strides
        self.bottleneck = OneClassBottleneck(shapes, strides)
        self.decoder = Decoder(shapes, strides, self.bottleneck.channels)
        self.blur_sigma = blur_sigma

    def distances(self, images: Tensor) -> list[Tensor]:
        """Per stage, 1 - cosine similarity of encoder and decoder features at every position: (B, h, w)."""
        with torch.no_grad():
            encoded = self.extractor(images)
        decoded = [
            d if d.shape[-2:] == e.shape[-2:] else F.interpolate(d, e.shape[-2:], mode="bilinear")  # odd sizes
            for e, d in zip(encoded, self.decoder(self.bottleneck(encoded)), strict=True)
        ]
        return [1 - F.cosine_similarity(e, d.float(), dim=1) for e, d in zip(encoded, decoded, strict=True)]
