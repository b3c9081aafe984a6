"""Ranks, device counts, gathering over ranks, and DDP for detectors without trainable parameters."""

from __future__ import annotations

import os
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy, StrategyRegistry
from torch import Tensor


def process_rank() -> int:
    """Global rank before any process group exists; 0 for plain single-process runs."""
    for variable in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if variable in os.environ:
            return int(os.environ[variable])
    return int(os.environ.get("NODE_RANK", 0)) * 100_000 + int(os.environ.get("LOCAL_RANK", 0))


class FrozenDDPStrategy(DDPStrategy):
    """DDP that leaves a module without trainable parameters unwrapped.

    torch's DistributedDataParallel refuses such modules, yet memory-bank detectors still need
    DDP's processes, sampler and collectives; they gather what they learn themselves.
    """

    def configure_ddp(self) -> None:
        if any(p.requires_grad for p in self.model.parameters()):
            super().configure_ddp()


def frozen_ddp(strategy: Any, devices: Any = 1, num_nodes: int = 1) -> Any:
    """The strategy to give a Trainer of a detector without trainable parameters: Lightning's DDP flavours
    (by name, or "auto" over several devices or nodes) become FrozenDDPStrategy; anything else passes through.
    Only trainers that lit-anomaly builds get it: Lightning's own registry is left alone."""
    if isinstance(strategy, str) and strategy in StrategyRegistry:
        entry = StrategyRegistry[strategy]
        if entry["strategy"] is DDPStrategy:
            return FrozenDDPStrategy(**entry["init_params"])
    count = device_count(devices)
    if strategy in (None, "auto") and (count is None or count > 1 or (num_nodes or 1) > 1):
        return FrozenDDPStrategy()  # DDP over what turns out to be one device is one process
    return strategy


def device_count(devices: Any) -> int | None:
    """How many devices a Trainer's `devices` names, as Lightning reads it: a count (the command line gives it
    as a string, "2"), indices ([0, 1] or "0,1"); None where only the accelerator knows ("auto", -1)."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    text = str(devices).strip()
    if "," in text:
        return len([index for index in text.split(",") if index.strip()])
    try:
        count = int(text)
    except ValueError:
        return None
    return count if count >= 0 else None


def gather_by_index(module: pl.LightningModule, index: Tensor, *values: Tensor) -> tuple[Tensor, ...]:
    """Rows of every rank, de-duplicated by `index` (DistributedSampler pads with repeats) and sorted by it."""
    if module.trainer.world_size > 1:
        index = module.all_gather(index).flatten(0, 1)
        values = tuple(module.all_gather(v).flatten(0, 1) for v in values)
    if len(index) < 2 or bool((index[1:] > index[:-1]).all()):
        return (index, *values)  # one process, sequential sampler: nothing to sort, no copies
    index, order = index.sort(stable=True)
    first = torch.ones_like(index, dtype=torch.bool)
    first[1:] = index[1:] != index[:-1]
    return (index[first], *(v[order][first] for v in values))
