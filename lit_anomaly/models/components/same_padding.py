"""TensorFlow's "SAME" convolutions without a padded copy of their input.

timm's Conv2dSame (tf_ EfficientNets and MobileNets) pads every input with F.pad before convolving: on
efficientnet_lite0 at 256 px those copies take a sixth of the backbone's CPU time. Where "SAME" pads one
more row or column after the input than before it, a kernel with one more tap in front, a zero, and even
padding covers the same windows with the same weights, so the convolution pads on the fly instead.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn


class CopyFreeConv2dSame(nn.Conv2d):
    """A Conv2d with TensorFlow's "SAME" padding for any input size (dilation 1), padding inside the convolution.

    Args:
        Those of nn.Conv2d; `padding` is ignored: it follows from each input's size.
    """

    def forward(self, x: Tensor) -> Tensor:
        padding, leading_zero = [], []
        for size, kernel, stride in zip(x.shape[-2:], self.kernel_size, self.stride, strict=True):
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            padding.append((total + 1) // 2)  # an odd total puts its extra row or column after the input
            leading_zero.append(total % 2)
        weight = F.pad(self.weight, (leading_zero[1], 0, leading_zero[0], 0)) if any(leading_zero) else self.weight
        return F.conv2d(x, weight, self.bias, self.stride, padding, 1, self.groups)


def replace_padded_copies(network: nn.Module) -> int:
    """Swap every timm Conv2dSame of dilation 1 in `network` for a CopyFreeConv2dSame holding the same parameters
    (same state dict, same outputs); returns how many were swapped."""
    from timm.layers import Conv2dSame

    swapped = 0
    for parent in list(network.modules()):
        for name, conv in list(parent.named_children()):
            if type(conv) is not Conv2dSame or conv.dilation != (1, 1):
                continue
            replacement = CopyFreeConv2dSame(
                conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, groups=conv.groups,
                bias=conv.bias is not None, device="meta",
            )  # fmt: skip
            replacement.weight, replacement.bias = conv.weight, conv.bias
            setattr(parent, name, replacement.train(conv.training))
            swapped += 1
    return swapped
