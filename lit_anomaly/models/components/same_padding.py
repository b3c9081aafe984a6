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

from .graph import exporting


class CopyFreeConv2dSame(nn.Conv2d):
    """A Conv2d with TensorFlow's "SAME" padding for any input size (dilation 1), padding inside the convolution.

    Args:
        Those of nn.Conv2d; `padding` is ignored: it follows from each input's size.
    """

    def forward(self, x: Tensor) -> Tensor:
        height, width = (
            max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            for size, kernel, stride in zip(x.shape[-2:], self.kernel_size, self.stride, strict=True)
        )  # "SAME"'s total padding; an odd total puts its extra row or column after the input
        # timm's padded copy on CUDA (cuDNN's depthwise kernels for 4x4 and 6x6 have not been measured here) and in
        # an exported graph (ONNX convolutions need a kernel of known shape)
        if x.is_cuda or exporting():
            x = F.pad(x, (width // 2, width - width // 2, height // 2, height - height // 2))
            return F.conv2d(x, self.weight, self.bias, self.stride, 0, 1, self.groups)
        weight = F.pad(self.weight, (width % 2, 0, height % 2, 0)) if height % 2 or width % 2 else self.weight
        return F.conv2d(x, weight, self.bias, self.stride, ((height + 1) // 2, (width + 1) // 2), 1, self.groups)


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
