"""Fold a frozen network's BatchNorm layers into the convolutions that feed them.

A frozen BatchNorm is a per-channel affine map, so conv -> BatchNorm equals one convolution with scaled
weights and a bias: a fifth of efficientnet_lite0's CPU time at 256 px goes to BatchNorm passes over
activations that folding removes. Which convolution feeds which BatchNorm is read from one traced
forward pass, and the folding is checked on a copy with random statistics before the network is touched.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import MutableMapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

NORM_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class FoldedNorm:
    """A BatchNorm (`norm`, with its `eps`) folded into the convolution `conv`; names relative to the network."""

    conv: str
    norm: str
    eps: float


def _foldable(norm: nn.Module) -> bool:
    """Plain BatchNorm2d, or timm's BatchNormAct2d (BatchNorm, then its `drop` and `act`), with running stats."""
    plain = type(norm) is nn.BatchNorm2d
    with_activation = isinstance(norm, nn.BatchNorm2d) and hasattr(norm, "act") and hasattr(norm, "drop")
    return (plain or with_activation) and norm.running_mean is not None and norm.running_var is not None


def _what_remains(norm: nn.Module) -> nn.Module:
    """What a folded BatchNorm leaves: nothing, or timm's dropout and activation after it."""
    if type(norm) is nn.BatchNorm2d:
        return nn.Identity()
    if isinstance(norm.drop, nn.Identity):
        return norm.act
    return nn.Sequential(norm.drop, norm.act)


def conv_norm_pairs(network: nn.Module, example: Tensor) -> list[FoldedNorm]:
    """(conv, BatchNorm) pairs where, in a forward pass of `example`, the BatchNorm's input is the very tensor the
    convolution returned, and each ran once (a module run twice may see other inputs the second time)."""
    names = {module: name for name, module in network.named_modules()}
    produced: dict[int, tuple[str, Tensor]] = {}  # the tensor is kept so that its id is not reused
    calls: Counter[str] = Counter()
    pairs: list[FoldedNorm] = []

    def after_conv(module: nn.Module, args: tuple, output: Tensor) -> None:
        calls[names[module]] += 1
        produced[id(output)] = (names[module], output)

    def before_norm(module: nn.Module, args: tuple) -> None:
        calls[names[module]] += 1
        producer = produced.get(id(args[0]))
        if producer is not None and producer[1] is args[0]:
            pairs.append(FoldedNorm(producer[0], names[module], module.eps))

    handles = []
    for module in names:
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(after_conv))
        elif isinstance(module, nn.BatchNorm2d) and _foldable(module):
            handles.append(module.register_forward_pre_hook(before_norm))
    try:
        with torch.no_grad():
            network(example)
    finally:
        for handle in handles:
            handle.remove()
    return [p for p in pairs if calls[p.conv] == 1 and calls[p.norm] == 1]


def _fold(network: nn.Module, pairs: list[FoldedNorm]) -> None:
    for pair in pairs:
        conv, norm = network.get_submodule(pair.conv), network.get_submodule(pair.norm)
        weight, bias = fuse_conv_bn_weights(
            conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias
        )
        conv.weight, conv.bias = weight, bias
        parent, _, attribute = pair.norm.rpartition(".")
        setattr(network.get_submodule(parent), attribute, _what_remains(norm))


def _randomise_statistics(network: nn.Module, generator: torch.Generator) -> None:
    for module in network.modules():
        if isinstance(module, nn.BatchNorm2d) and module.running_mean is not None:
            channels = module.num_features
            module.running_mean.copy_(torch.randn(channels, generator=generator))
            module.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
            if module.weight is not None:
                module.weight.data.copy_(torch.rand(channels, generator=generator) + 0.5)
                module.bias.data.copy_(torch.randn(channels, generator=generator))


def _outputs(network: nn.Module, example: Tensor) -> list[Tensor]:
    with torch.no_grad():
        output = network(example)
    return list(output) if isinstance(output, (list, tuple)) else [output]


def fold_batchnorm(network: nn.Module, example: Tensor) -> list[FoldedNorm]:
    """Fold every BatchNorm of the frozen, eval-mode `network` that directly follows a convolution into it, in
    place; returns what was folded (nothing where the check fails: the network is then left as it was).

    The check runs on a copy whose BatchNorm statistics are random, so a pairing that happens to be harmless
    for this network's weights (identity statistics of a random initialisation) cannot pass it."""
    pairs = conv_norm_pairs(network, example)
    if not pairs:
        return []
    trial = copy.deepcopy(network)
    _randomise_statistics(trial, torch.Generator().manual_seed(0))
    expected = _outputs(trial, example)
    _fold(trial, pairs)
    for got, want in zip(_outputs(trial, example), expected, strict=True):
        if not torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max())):
            return []
    _fold(network, pairs)
    return pairs


def fold_saved_norms(state: MutableMapping[str, Tensor], prefix: str, pairs: list[FoldedNorm]) -> None:
    """Fold the BatchNorm entries of a state dict saved before folding (under `prefix`) into their convolutions'
    weight and bias entries, in place, as `fold_batchnorm` folded the modules."""
    for pair in pairs:
        conv, norm = f"{prefix}{pair.conv}.", f"{prefix}{pair.norm}."
        if f"{norm}running_var" not in state:
            continue
        weight, bias = fuse_conv_bn_weights(
            state[f"{conv}weight"],
            state.get(f"{conv}bias"),
            state[f"{norm}running_mean"],
            state[f"{norm}running_var"],
            pair.eps,
            state.get(f"{norm}weight"),
            state.get(f"{norm}bias"),
        )
        state[f"{conv}weight"], state[f"{conv}bias"] = weight.detach(), bias.detach()
        for key in NORM_KEYS:
            state.pop(f"{norm}{key}", None)
