"""AnomalyModule: the lifecycle every detector shares (fit, calibrate, test, predict)."""

from __future__ import annotations

import itertools
import math
import time
from typing import Any, Protocol, runtime_checkable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from ..metrics import resolve_quantile
from ..metrics.calibration import SOURCE_SPLITS, SPLIT, TRAIN, Calibration, ThresholdCalibrator
from ..metrics.evaluation import TestResult, evaluate_test
from ..runtime.decision import flagged
from ..utils.distributed import gather_by_index
from .components import blur_kernel_size


@runtime_checkable
class ResultListener(Protocol):
    """A callback that takes the detector's results as they are made: its calibration (after fit, or after the
    validate that calibrates a trained detector) and its test result, gathered over ranks. Results are handed
    on, never left on the detector for others to read."""

    def on_calibration(self, trainer: pl.Trainer, calibration: Calibration) -> None: ...

    def on_test_result(self, trainer: pl.Trainer, result: TestResult) -> None: ...


def parse_calibration(value: str) -> tuple[str, int]:
    """`--model.calibration`: ("leave-one-out", 0), ("k-fold", K) or ("none", 0)."""
    name, _, folds = value.partition(":")
    if name in ("leave-one-out", "none") and not folds:
        return name, 0
    if name == "k-fold" and folds.isdigit() and int(folds) >= 2:
        return name, int(folds)
    raise ValueError(f"--model.calibration must be leave-one-out, k-fold:K (K >= 2) or none, got {value!r}")


def fold_assignment(n: int, folds: int, seed: int = 0) -> Tensor:
    """Fold (0 .. folds - 1) of each of n images: a seeded shuffle dealt round-robin, sizes within one."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    assignment = torch.empty(n, dtype=torch.long)
    assignment[order] = torch.arange(n) % folds
    return assignment


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class AnomalyModule(pl.LightningModule):
    """Shared lifecycle; a detector provides `learn`, `finish_fit`, `forward` and, to calibrate on its
    own train normals, `out_of_sample_scores`.

    fit: `learn` sees every train batch; `finish_fit` builds the model (memory bank, Gaussians) and
    the detector scores every train normal with a model that did not see it (leave-one-out or
    k-fold). The validation loop scores held-out or validation normals, if the data has any, with the
    final model. All these scores calibrate the threshold by the rank rule (`ThresholdCalibrator`);
    the result is `self.calibration`, and the threshold is a buffer, so checkpoints carry it.
    test: image and pixel metrics on raw scores (`evaluate_test`), handed to every `ResultListener` callback.

    Args:
        calibration_quantile: threshold quantile q in (0, 1): at most a share 1 - q of good parts the
            detector never saw is flagged, on average. Default 0.995 (unless contamination is given).
        contamination: alternative to calibration_quantile: the expected share of flagged good parts,
            in (0, 1); q = 1 - contamination. Give one of the two, not both.
        calibration: how train normals are scored for the threshold: leave-one-out (default), k-fold:K
            (K >= 2 refits), or none (only held-out or validation normals calibrate).
        pixel_eval_size: compute pixel metrics at this square size in px (default: the input size).
        aupro_fpr_limit: false-positive-rate limit of AUPRO, in (0, 1]; MVTec's 0.3 by default.
    """

    trains_with_gradients = False  # memory-bank detectors: one pass over train, no optimiser

    def __init__(
        self,
        calibration_quantile: float | None = None,
        contamination: float | None = None,
        calibration: str = "leave-one-out",
        pixel_eval_size: int | None = None,
        aupro_fpr_limit: float = 0.3,
    ) -> None:
        super().__init__()
        self.quantile = resolve_quantile(calibration_quantile, contamination)
        self.train_scoring, self.folds = parse_calibration(calibration)
        self.pixel_eval_size = pixel_eval_size
        self.aupro_fpr_limit = aupro_fpr_limit
        self.automatic_optimization = self.trains_with_gradients
        self.calibrator = ThresholdCalibrator(self.quantile)
        self.register_buffer("threshold", torch.tensor(math.nan, dtype=torch.float64))
        self.register_buffer("fitted", torch.tensor(False))
        # the input size [H, W] the detector was fitted at (0, 0 before): a checkpoint carries its preprocessing
        self.register_buffer("fit_image_size", torch.zeros(2, dtype=torch.long))
        self.calibration: Calibration | None = None  # the fitted threshold's provenance, saved in checkpoints

    # ---- what a detector provides -----------------------------------------------------------
    def learn(self, batch: dict[str, Any]) -> None:
        raise NotImplementedError

    def finish_fit(self) -> None:
        raise NotImplementedError

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """{"score": (B,), "anomaly_map": (B, 1, H, W)} on raw scales."""
        raise NotImplementedError

    def threshold_margin(self) -> float:
        """What the threshold must carry beyond the rank rule's score: a detector that stores its train features
        at lower precision than it scores test images with says how far that rounding can move a score."""
        return 0.0

    def out_of_sample_scores(self, method: str, folds: int) -> tuple[Tensor, Tensor]:
        """(train index, score) of this rank's share of train normals, each scored by a model that did not
        see it (`method` leave-one-out or k-fold with `folds` folds). Called right after `finish_fit`."""
        raise NotImplementedError(f"{type(self).__name__} cannot score its train images out of sample")

    # ---- checkpoints ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.calibration is not None:
            checkpoint["calibration"] = self.calibration.state()
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        checkpoint["classes"] = {  # what `lit-anomaly predict --ckpt_path` builds when not told
            "model": class_path(type(self)),
            "data": class_path(getattr(datamodule, "family", type(datamodule))) if datamodule is not None else None,
        }
        # LightningCLI reads a checkpoint's arguments as those of the class named here, as it records for a
        # detector it built: a detector built in Python then loads in `predict` as one built by the CLI
        checkpoint.get(self.CHECKPOINT_HYPER_PARAMS_KEY, {}).setdefault("_class_path", class_path(type(self)))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Fitted buffers (memory bank, Gaussians) have data-dependent shapes: take the checkpoint's."""
        state = checkpoint["state_dict"]
        legacy_quantile, legacy_count = state.pop("threshold_quantile", None), state.pop("threshold_count", None)
        state.setdefault("fit_image_size", torch.zeros(2, dtype=torch.long))  # 0.1 checkpoints: size unknown
        if legacy_count is not None and "calibration" not in checkpoint:  # 0.1: interpolated quantile of a hold-out
            threshold = float(state["threshold"])
            self.calibration = Calibration(
                None if math.isnan(threshold) else threshold, float(legacy_quantile), "hold-out (lit-anomaly 0.1)",
                int(legacy_count), None, None,
            )  # fmt: skip
        for name, buffer in list(self.named_buffers()):
            if name in state and state[name].shape != buffer.shape:
                owner_name, _, attribute = name.rpartition(".")
                owner = self.get_submodule(owner_name) if owner_name else self
                owner.register_buffer(attribute, torch.empty_like(state[name], device=buffer.device))
        if "calibration" in checkpoint:
            self.calibration = Calibration.from_state(checkpoint["calibration"])

    # ---- fit and calibration ----------------------------------------------------------------
    @property
    def calibrated_threshold(self) -> float | None:
        """The threshold, or None before calibration (or when there were no calibration normals)."""
        value = float(self.threshold)
        return None if math.isnan(value) else value

    @property
    def threshold_provenance(self) -> dict[str, Any] | None:
        return self.calibration.provenance() if self.calibration is not None else None

    def threshold_for(self, category: str | None) -> float | None:
        """The threshold that decides for `category`: its own if the detector was fitted on several categories
        (a unified run) and holds one for it, else the class-agnostic one."""
        own = self.calibration.categories.get(category) if self.calibration is not None and category else None
        return own.threshold if own is not None else self.calibrated_threshold

    def _decision_threshold(self) -> float | None:
        """The threshold for the category of the data being tested or predicted (`--data.category`)."""
        return self.threshold_for(getattr(self.trainer.datamodule, "category", None))

    def setup(self, stage: str) -> None:
        if stage == "fit" and not self.trains_with_gradients:
            self.trainer.fit_loop.max_epochs = 1  # a memory bank is built from one pass over train
        size = getattr(self.trainer.datamodule, "image_size", None)
        if size is not None and stage == "fit":
            self.check_image_size(tuple(size))

    def check_image_size(self, size: tuple[int, int]) -> None:
        """Fail before fitting, naming the flag, if the backbone or the map's blur cannot take `size` (or the
        blur is negative, which would turn it off as silently as 0)."""
        sigma = getattr(self.model, "blur_sigma", 0.0)
        if sigma < 0:
            raise ValueError(f"--model.blur_sigma must be 0 (no blur) or more px, got {sigma}")
        needed = blur_kernel_size(sigma) // 2 + 1 if sigma > 0 else 1
        if min(size) < needed:
            raise ValueError(
                f"--data.image_size {list(size)} is too small for {type(self).__name__}: the anomaly map's blur "
                f"(blur_sigma {sigma}) needs at least {needed} px a side"
            )
        try:
            self.model.extractor.check_input_size(size)
        except RuntimeError as error:
            raise ValueError(
                f"--data.image_size {list(size)} does not fit backbone {self.model.extractor.backbone!r}: "
                f"{str(error).splitlines()[0]}"
            ) from error

    def configure_optimizers(self) -> Any:
        return None

    def on_train_epoch_start(self) -> None:
        self.fitted.fill_(False)
        self.calibrator.reset()
        self._calibration_seconds = 0.0
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

    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.fit_image_size.copy_(torch.tensor(batch["image"].shape[-2:]))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        with torch.no_grad():
            self.learn(batch)

    def score(self, images: Tensor) -> dict[str, Tensor]:
        """`forward` for scoring, refusing what would turn every metric and decision silently wrong: images of
        another size than the detector was fitted at, and non-finite scores."""
        self.check_input_size(images)
        output = self(images)
        if not torch.isfinite(output["score"]).all():
            raise ValueError(
                f"{type(self).__name__} produced non-finite anomaly scores: a trained detector diverged "
                "(lower --model.lr) or the weights are broken"
            )
        return output

    def check_input_size(self, images: Tensor) -> None:
        """A fitted detector only scores images of the size it was fitted at: anything else is silently wrong."""
        fitted = tuple(self.fit_image_size.tolist())
        if any(fitted) and tuple(images.shape[-2:]) != fitted:
            raise ValueError(
                f"--data.image_size {list(images.shape[-2:])} differs from the size the detector was fitted at, "
                f"{list(fitted)}: pass --data.image_size {list(fitted)}"
            )

    def _finish_fit_once(self) -> None:
        if bool(self.fitted):
            return
        with torch.no_grad():
            self.finish_fit()
            self.fitted.fill_(True)
            started = time.perf_counter()
            empty = torch.empty(0, device=self.device)
            index, scores = (empty.long(), empty)
            if self.train_scoring != "none":
                index, scores = self.out_of_sample_scores(self.train_scoring, self.folds)
            self.calibrator.update(scores, index, TRAIN)  # every rank updates, even with nothing
            self._calibration_seconds += time.perf_counter() - started

    def on_validation_epoch_start(self) -> None:
        if not self.trainer.sanity_checking:
            self._finish_fit_once()  # validation runs before on_train_epoch_end
            self._validation_started = time.perf_counter()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if not self.trainer.sanity_checking:
            self.calibrator.update(self.score(batch["image"])["score"], batch["index"], SPLIT)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._calibration_seconds += time.perf_counter() - self._validation_started

    def on_train_epoch_end(self) -> None:
        self._finish_fit_once()  # when there is no calibration split, validation never ran
        train_method = self.train_scoring if self.folds == 0 else f"{self.train_scoring}:{self.folds}"
        self._calibrate(train_method)

    def _calibrate(self, train_method: str | None) -> None:
        """Turn the collected out-of-sample scores into `self.calibration` and the threshold buffer."""
        datamodule = self.trainer.datamodule
        split_method = getattr(datamodule, "calibration_source", None) or "hold-out"
        categories = None
        if hasattr(datamodule, "sample_categories"):  # a unified run: each category also calibrates on its own
            categories = {source: datamodule.sample_categories(split) for source, split in SOURCE_SPLITS.items()}
        calibration = self.calibrator.compute(train_method, split_method, categories)
        calibration = calibration.with_margin(self.threshold_margin())
        calibration.seconds = self._calibration_seconds
        self.calibration = calibration
        self.threshold.fill_(math.nan if calibration.threshold is None else calibration.threshold)
        if calibration.threshold is not None:
            self.log("threshold", calibration.threshold, sync_dist=True)
        for listener in self._listeners():
            listener.on_calibration(self.trainer, calibration)

    def category_runs(self, train_indices: Tensor) -> list[int] | None:
        """In a unified fit, the sizes of the consecutive runs of one category among these ascending train indices
        (a memory bank keeps each category's share by choosing in blocks of one category); None otherwise."""
        categories = getattr(self.trainer.datamodule, "sample_categories", None)
        if categories is None:
            return None
        of = categories("train")
        return [len(list(run)) for _, run in itertools.groupby(of[i] for i in train_indices.tolist())]

    def _listeners(self) -> list[ResultListener]:
        return [callback for callback in self.trainer.callbacks if isinstance(callback, ResultListener)]

    # ---- test -------------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        checkpoint = getattr(self.trainer, "ckpt_path", None) if self._trainer is not None else None
        if not bool(self.fitted) and checkpoint:
            raise ValueError(
                f"--ckpt_path {checkpoint} holds a {type(self).__name__} that was never fitted (its fit ran no "
                "training step); fit it again with at least one epoch"
            )
        if not bool(self.fitted):
            raise ValueError(
                f"the {type(self).__name__} detector is not fitted: fit it first, or pass --ckpt_path FILE "
                "(a detector.ckpt written by lit-anomaly fit)"
            )

    def on_test_start(self) -> None:
        self._check_fitted()

    def on_predict_start(self) -> None:
        self._check_fitted()

    def on_test_epoch_start(self) -> None:
        self._test: list[dict[str, Tensor]] = []

    def _eval_resolution(self, maps: Tensor, masks: Tensor, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Maps, masks and uint8 images at the size pixel metrics use (`pixel_eval_size`): what a test keeps of
        each image until its end, so that memory follows the eval size and not the input size."""
        size = (self.pixel_eval_size,) * 2 if self.pixel_eval_size is not None else tuple(maps.shape[-2:])
        if tuple(maps.shape[-2:]) != size:
            maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
            masks = F.interpolate(masks, size=size, mode="nearest")
            images = F.interpolate(images, size=size, mode="bilinear", antialias=True).clamp_(0, 1)
        return maps[:, 0], masks[:, 0], images.mul(255).round_().to(torch.uint8)  # unresized: the loader's bytes

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        output = self.score(batch["image"])
        maps, masks, images = self._eval_resolution(output["anomaly_map"].float(), batch["mask"], batch["image"])
        self._test.append(
            {
                "index": batch["index"], "score": output["score"].double(), "label": batch["label"],
                "has_mask": batch["has_mask"], "map": maps, "mask": masks.bool(), "image": images,
            }
        )  # fmt: skip

    def on_test_epoch_end(self) -> None:
        keys = ("score", "label", "has_mask", "map", "mask", "image")
        index, *values = gather_by_index(
            self,
            torch.cat([s["index"] for s in self._test]),
            *(torch.cat([s[k] for s in self._test]) for k in keys),
        )
        outputs = dict(zip(keys, (v.cpu() for v in values), strict=True), index=index.cpu())
        self._test = []
        result = evaluate_test(outputs, self._decision_threshold(), self.aupro_fpr_limit)
        logged = {f"test/{k}": v for k, v in result.metrics.items() if v is not None}
        if result.threshold is not None:
            logged["test/threshold"] = result.threshold
        self.log_dict(logged, sync_dist=True)
        for listener in self._listeners():
            listener.on_test_result(self.trainer, result)

    # ---- predict ----------------------------------------------------------------------------
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Scores of the readable images; unreadable ones pass through under `failed`."""
        threshold = self._decision_threshold()
        if "image" not in batch:  # every file of the batch failed to decode
            return {"path": [], "failed": batch["failed"], "threshold": threshold}
        output = self.score(batch["image"])
        output["pred"] = flagged(output["score"], threshold) if threshold is not None else None
        output.update(index=batch["index"], path=batch["path"], threshold=threshold, failed=batch["failed"])
        return output
