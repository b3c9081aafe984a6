"""Reverse Distillation (Deng & Li, CVPR 2022) as a pure nn.Module: a frozen encoder, a trainable one-class
bottleneck (OCBE) and a decoder that reconstructs the encoder's multi-scale features from it."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
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


class OneClassBottleneck(nn.Module):
    """Fuses every stage, brought to the last stage's resolution by stride-2 convolutions, into one compact
    embedding at half that resolution (the paper's multi-scale fusion and one-class embedding)."""

    def __init__(self, channels: Sequence[int], strides: Sequence[int]) -> None:
        super().__init__()
        steps, width = stride_steps(strides), channels[-1]
        self.align = nn.ModuleList(
            nn.Sequential(*(conv_block(c if k == 0 else width, width, 2) for k in range(steps[-1] - step)))
            for c, step in zip(channels, steps, strict=True)
        )
        self.fuse = nn.Sequential(
            nn.Conv2d(width * len(channels), 2 * width, 1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            conv_block(2 * width, 2 * width, 2),
            conv_block(2 * width, 2 * width),
        )

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        return self.fuse(torch.cat([align(f) for align, f in zip(self.align, features, strict=True)], dim=1))


class Decoder(nn.Module):
    """From the embedding back up, stage by stage (last to first): transposed-convolution upsampling to each
    stage's stride, then two conv blocks to its channels."""

    def __init__(self, channels: Sequence[int], strides: Sequence[int]) -> None:
        super().__init__()
        steps = stride_steps(strides)
        stages, source = [], 2 * channels[-1]
        targets = list(reversed(range(len(channels))))
        for i in targets:
            factor = 2 if i == targets[0] else 2 ** (steps[i + 1] - steps[i])
            stages.append(
                nn.Sequential(
                    nn.ConvTranspose2d(source, channels[i], factor, stride=factor, bias=False),
                    nn.BatchNorm2d(channels[i]),
                    nn.ReLU(inplace=True),
                    conv_block(channels[i], channels[i]),
                    nn.Conv2d(channels[i], channels[i], 3, padding=1),
                )
            )
            source = channels[i]
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
        channels, strides = self.extractor.channels, self.extractor.strides
        self.bottleneck = OneClassBottleneck(channels, strides)
        self.decoder = Decoder(channels, strides)
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
