"""AnomalyModule: the lifecycle every detector shares (fit, calibrate, test, predict)."""

from __future__ import annotations

import math
import time
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.strategies import DDPStrategy, StrategyRegistry
from torch import Tensor

from ..metrics import aupro, image_metrics, pixel_auroc, quantile_threshold, resolve_quantile


class FrozenDDPStrategy(DDPStrategy):
    """DDP that leaves a module without trainable parameters unwrapped.

    torch's DistributedDataParallel refuses such modules, yet memory-bank detectors still need
    DDP's processes, sampler and collectives; they gather what they learn themselves.
    """

    def configure_ddp(self) -> None:
        if any(p.requires_grad for p in self.model.parameters()):
            super().configure_ddp()


for _name, _entry in list(StrategyRegistry.items()):  # every ddp* flavour, incl. Lightning's "auto" choice
    if _entry["strategy"] is DDPStrategy:
        StrategyRegistry.register(
            _name,
            FrozenDDPStrategy,
            description=_entry["description"],
            override=True,
            **_entry["init_params"],
        )


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


class AnomalyModule(pl.LightningModule):
    """Shared lifecycle; a detector provides `learn`, `finish_fit` and `forward` only.

    fit: `learn` sees every train batch; at the end of the epoch `finish_fit` builds the model
    (memory bank, Gaussians); the validation loop then scores the held-out calibration normals
    and stores threshold = quantile(scores, q) with its provenance as buffers, so checkpoints carry it.
    test: image and pixel metrics on raw scores, per-image results in `test_results`.
    """

    trains_with_gradients = False  # memory-bank detectors: one pass over train, no optimiser

    def __init__(
        self,
        calibration_quantile: float | None = None,
        contamination: float | None = None,
        pixel_eval_size: int | None = None,
        aupro_fpr_limit: float = 0.3,
    ) -> None:
        super().__init__()
        self.quantile = resolve_quantile(calibration_quantile, contamination)
        self.pixel_eval_size = pixel_eval_size
        self.aupro_fpr_limit = aupro_fpr_limit
        self.automatic_optimization = self.trains_with_gradients
        self.register_buffer("threshold", torch.tensor(math.nan, dtype=torch.float64))
        self.register_buffer("threshold_quantile", torch.tensor(self.quantile, dtype=torch.float64))
        self.register_buffer("threshold_count", torch.tensor(0, dtype=torch.long))
        self.register_buffer("fitted", torch.tensor(False))
        self.test_results: dict[str, Tensor] = {}
        self.test_metrics: dict[str, float | None] = {}
        self.test_notes: dict[str, str] = {}
        self.calibration_scores = torch.empty(0)
        self.timing: dict[str, float] = {}

    # ---- what a detector provides -----------------------------------------------------------
    def learn(self, batch: dict[str, Any]) -> None:
        raise NotImplementedError

    def finish_fit(self) -> None:
        raise NotImplementedError

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """{"score": (B,), "anomaly_map": (B, 1, H, W)} on raw scales."""
        raise NotImplementedError

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Fitted buffers (memory bank, Gaussians) have data-dependent shapes: take the checkpoint's."""
        state = checkpoint["state_dict"]
        for name, buffer in list(self.named_buffers()):
            if name in state and state[name].shape != buffer.shape:
                owner_name, _, attribute = name.rpartition(".")
                owner = self.get_submodule(owner_name) if owner_name else self
                owner.register_buffer(attribute, torch.empty_like(state[name], device=buffer.device))

    # ---- fit and calibration ----------------------------------------------------------------
    @property
    def calibrated_threshold(self) -> float | None:
        """The threshold, or None before calibration (or when there were no calibration normals)."""
        value = float(self.threshold)
        return None if math.isnan(value) else value

    @property
    def threshold_provenance(self) -> dict[str, Any]:
        return {
            "quantile": float(self.threshold_quantile),
            "source": "quantile of detector scores on held-out normal images",
            "split": "calibration",
            "n": int(self.threshold_count),
        }

    def setup(self, stage: str) -> None:
        if stage == "fit" and not self.trains_with_gradients:
            self.trainer.fit_loop.max_epochs = 1  # a memory bank is built from one pass over train

    def configure_optimizers(self) -> Any:
        return None

    def on_train_epoch_start(self) -> None:
        self.fitted.fill_(False)
        self._seen_indices: set[int] = set()

    def first_occurrences(self, index: Tensor) -> Tensor:
        """Mask of this rank's samples not yet seen on any rank: DistributedSampler pads shards with repeats."""
        rank, batch = 0, len(index)
        everyone = index
        if self.trainer.world_size > 1:  # every rank's batch of this step, in rank order
            everyone, rank = self.all_gather(index).flatten(), self.global_rank
        fresh = []
        for position, value in enumerate(everyone.tolist()):
            if rank * batch <= position < (rank + 1) * batch:
                fresh.append(value not in self._seen_indices)
            self._seen_indices.add(value)
        return torch.tensor(fresh, dtype=torch.bool, device=index.device)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        with torch.no_grad():
            self.learn(batch)

    def _finish_fit_once(self) -> None:
        if not bool(self.fitted):
            self.finish_fit()
            self.fitted.fill_(True)

    def on_validation_epoch_start(self) -> None:
        self._calibration: list[tuple[Tensor, Tensor]] = []
        if not self.trainer.sanity_checking:
            self._finish_fit_once()  # validation runs before on_train_epoch_end
            self._calibration_started = time.perf_counter()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if not self.trainer.sanity_checking:
            self._calibration.append((batch["index"], self(batch["image"])["score"]))

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or not self._calibration:
            return
        index, scores = (torch.cat(parts) for parts in zip(*self._calibration, strict=True))
        _, scores = gather_by_index(self, index, scores)
        self.calibration_scores = scores.detach().cpu()
        self.threshold.fill_(quantile_threshold(scores, self.quantile))
        self.threshold_count.fill_(len(scores))
        self.timing["calibrate_s"] = time.perf_counter() - self._calibration_started
        self.log("threshold", float(self.threshold), sync_dist=True)

    def on_train_epoch_end(self) -> None:
        self._finish_fit_once()  # when there is no calibration split, validation never ran

    # ---- test -------------------------------------------------------------------------------
    def on_test_epoch_start(self) -> None:
        self._test: list[dict[str, Tensor]] = []

    def _eval_resolution(self, maps: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
        if self.pixel_eval_size is None or maps.shape[-1] == self.pixel_eval_size:
            return maps[:, 0], masks[:, 0]
        size = (self.pixel_eval_size, self.pixel_eval_size)
        maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
        return maps[:, 0], F.interpolate(masks, size=size, mode="nearest")[:, 0]

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        output = self(batch["image"])
        maps, masks = self._eval_resolution(output["anomaly_map"].float(), batch["mask"])
        self._test.append(
            {
                "index": batch["index"], "score": output["score"].double(), "label": batch["label"],
                "has_mask": batch["has_mask"], "map": maps, "mask": masks.bool(),
            }
        )  # fmt: skip

    def on_test_epoch_end(self) -> None:
        keys = ("score", "label", "has_mask", "map", "mask")
        index, *values = gather_by_index(
            self,
            torch.cat([s["index"] for s in self._test]),
            *(torch.cat([s[k] for s in self._test]) for k in keys),
        )
        results = dict(zip(keys, (v.cpu() for v in values), strict=True), index=index.cpu())
        self._test = []
        threshold = self.calibrated_threshold
        metrics, notes = image_metrics(results["score"], results["label"], threshold)
        metrics.update(self.pixel_metrics(results, notes))
        self.test_metrics, self.test_notes = metrics, notes
        self.test_results = {k: results[k] for k in ("index", "score", "label")}
        self.test_results["pred"] = (results["score"] >= threshold).long() if threshold is not None else None
        self.test_maps = {"map": results["map"], "mask": results["mask"]}
        logged = {f"test/{k}": v for k, v in metrics.items() if v is not None}
        if threshold is not None:
            logged["test/threshold"] = threshold
        self.log_dict(logged, sync_dist=True)

    def pixel_metrics(self, results: dict[str, Tensor], notes: dict[str, str]) -> dict[str, float | None]:
        usable = results["has_mask"] & (results["label"] >= 0)
        maps, masks = results["map"][usable], results["mask"][usable]
        if not masks.any() or masks.all():
            reason = "no ground-truth masks for anomalous test images" if not masks.any() else "no normal pixels"
            notes.update(pixel_auroc=reason, pixel_aupro=reason)
            return {"pixel_auroc": None, "pixel_aupro": None}
        return {
            "pixel_auroc": pixel_auroc(maps, masks),
            "pixel_aupro": aupro(maps, masks, self.aupro_fpr_limit),
        }

    # ---- predict ----------------------------------------------------------------------------
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        output = self(batch["image"])
        threshold = self.calibrated_threshold
        output["pred"] = output["score"] >= threshold if threshold is not None else None
        output.update(index=batch["index"], path=batch["path"], threshold=threshold)
        return output
