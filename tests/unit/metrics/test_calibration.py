"""Thresholds: the split-conformal rank rule, out-of-sample train scores, and the promise on unseen normals."""

import math

import pytest
import pytorch_lightning as pl
import torch

from lit_anomaly.callbacks import ResultCollector, result_collector
from lit_anomaly.data import MVTecAD, write_synthetic
from lit_anomaly.metrics.calibration import (
    SPLIT,
    TRAIN,
    Calibration,
    ThresholdCalibrator,
    conformal_threshold,
    normals_needed,
    resolve_quantile,
)
from lit_anomaly.models import PaDiM, PatchCore
from lit_anomaly.models.lifecycle import fold_assignment
from lit_anomaly.models.padim.torch_model import gaussian


def trainer() -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[ResultCollector()],
    )  # fmt: skip


@pytest.mark.parametrize(("n", "q", "rank"), [(99, 0.9, 90), (100, 0.9, 91), (19, 0.95, 19), (199, 0.995, 199)])
def test_rank_rule_takes_the_ceil_n_plus_one_q_th_smallest(n, q, rank):
    scores = torch.randperm(n, generator=torch.Generator().manual_seed(n)).double()  # 0 .. n-1, shuffled
    calibration = conformal_threshold(scores, q, "leave-one-out")
    assert calibration.rank == rank == math.ceil((n + 1) * q - 1e-9)
    assert calibration.threshold == rank - 1  # the rank-th smallest of 0 .. n-1
    assert calibration.false_alarm_bound == pytest.approx(1 - q)
    assert (n + 1 - rank) / (n + 1) <= 1 - q + 1e-12  # the exact guarantee behind the promise
    assert not calibration.short_of_normals and calibration.shortfall_message() is None
    assert "normals_needed" not in calibration.provenance()


def test_too_few_normals_take_the_largest_score_and_say_what_q_needs():
    calibration = conformal_threshold(torch.tensor([3.0, 1.0, 2.0, 5.0, 4.0]), 0.995, "leave-one-out")
    assert calibration.threshold == 5.0 and calibration.rank == 5
    assert calibration.false_alarm_bound == pytest.approx(1 / 6)
    provenance = calibration.provenance()
    assert provenance["normals_needed"] == 199 == normals_needed(0.995)
    assert {k: provenance[k] for k in ("quantile", "method", "n", "rank")} == {
        "quantile": 0.995, "method": "leave-one-out", "n": 5, "rank": 5,
    }  # fmt: skip
    message = calibration.shortfall_message()
    assert "\n" not in message and "199" in message and "got 5" in message and "0.167" in message
    assert normals_needed(0.95) == 19 and normals_needed(0.9) == 9


def test_no_scores_no_threshold():
    calibration = conformal_threshold(torch.empty(0), 0.9)
    assert calibration.threshold is None and calibration.n == 0 and calibration.false_alarm_bound is None


def test_quantile_and_contamination_together_are_refused():
    assert resolve_quantile(contamination=0.05) == pytest.approx(0.95)
    with pytest.raises(ValueError, match="not both"):
        resolve_quantile(0.9, 0.05)


def test_calibrator_drops_repeats_and_names_its_sources():
    calibrator = ThresholdCalibrator(0.5)
    calibrator.update(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 1, 2]), TRAIN)
    calibrator.update(torch.tensor([3.0]), torch.tensor([2]), TRAIN)  # DistributedSampler's padded repeat
    calibrator.update(torch.tensor([10.0, 20.0]), torch.tensor([0, 1]), SPLIT)  # same indices, other split
    calibration = calibrator.compute("leave-one-out", "validation")
    assert calibration.n == 5 and calibration.method == "leave-one-out+validation"
    assert calibration.scores.tolist() == [1.0, 2.0, 3.0, 10.0, 20.0]
    assert calibration.threshold == 3.0  # k = ceil(6 * 0.5) = 3


def test_each_category_of_a_unified_fit_gets_the_rank_rule_over_its_own_scores():
    calibrator = ThresholdCalibrator(0.5)
    calibrator.update(torch.tensor([1.0, 2.0, 5.0, 6.0]), torch.tensor([0, 1, 2, 3]), TRAIN)
    calibrator.update(torch.tensor([6.0]), torch.tensor([3]), TRAIN)  # a padded repeat, dropped as always
    calibrator.update(torch.tensor([3.0, 7.0]), torch.tensor([0, 1]), SPLIT)
    categories = {TRAIN: ["a", "a", "b", "b"], SPLIT: ["a", "b"]}
    calibration = calibrator.compute("leave-one-out", "hold-out", categories).with_margin(0.25)
    assert calibration.scores.tolist() == [1.0, 2.0, 3.0, 5.0, 6.0, 7.0] and calibration.threshold == 5.25
    a, b = calibration.categories["a"], calibration.categories["b"]
    assert a.scores.tolist() == [1.0, 2.0, 3.0] and a.threshold == 2.25 and a.method == "leave-one-out+hold-out"
    assert b.scores.tolist() == [5.0, 6.0, 7.0] and b.threshold == 6.25 and b.margin == 0.25
    assert calibration.for_category("b") is b and calibration.for_category("c") is calibration
    assert "scope" in calibration.provenance() and "scope" not in a.provenance()
    restored = Calibration.from_state(calibration.state())
    assert restored.categories["b"].provenance() == b.provenance() and restored.threshold == calibration.threshold


def test_one_calibration_normal_gives_a_threshold_and_its_provenance():
    """A 10% hold-out of 6-14 train images is one image; torchmetrics squeezes a one-element result to 0-d."""
    calibrator = ThresholdCalibrator(0.995)
    calibrator.update(torch.tensor([0.4]), torch.tensor([0]), SPLIT)
    calibration = calibrator.compute(None, "hold-out")
    assert calibration.threshold == pytest.approx(0.4) and calibration.false_alarm_bound == 0.5
    assert calibration.provenance()["score_range"] == [pytest.approx(0.4)] * 2
    assert Calibration.from_state(calibration.state()).scores.shape == (1,)


def test_calibration_state_round_trips():
    calibration = conformal_threshold(torch.arange(10.0), 0.8, "k-fold:5")
    restored = Calibration.from_state(calibration.state())
    assert restored.provenance() == calibration.provenance() and torch.equal(restored.scores, calibration.scores)


def test_folds_are_balanced_and_seeded():
    folds = fold_assignment(23, 5, seed=3)
    assert sorted(torch.bincount(folds).tolist()) == [4, 4, 5, 5, 5]
    assert torch.equal(folds, fold_assignment(23, 5, seed=3)) and not torch.equal(folds, fold_assignment(23, 5, 4))


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("tiny"), "MVTecAD", ["tile"], 6, 2, 2, image_size=32)


def test_padim_leave_one_out_equals_a_refit_without_the_image(fit_tiny, tiny_root):
    model, images = fit_tiny(PaDiM, tiny_root, 32, n_features=12, layers=(1, 2))
    torch_model = model.model
    embeddings = torch_model.embed(images).double()  # PaDiM fits and stores float32 values
    brute_force = []
    for left_out in range(6):
        keep = [i for i in range(6) if i != left_out]
        total, outer = torch_model.accumulate(embeddings[keep], None, None)
        mean, inverse, _ = gaussian(total, outer, 5, torch_model.covariance_eps)
        distances = torch_model.distances(embeddings[left_out : left_out + 1].float(), mean.T.float(), inverse)
        brute_force.append(float(torch_model.output(distances, (32, 32))["score"]))
    loo = model.calibration.scores  # sorted
    assert model.calibration.method == "leave-one-out" and model.calibration.n == 6
    assert loo.tolist() == pytest.approx(sorted(brute_force), rel=1e-5)


@pytest.mark.parametrize(("block_size", "top_k"), [(None, 1), (32, 1), (32, 4)])
def test_patchcore_leave_one_out_equals_scoring_against_the_repaired_bank(fit_tiny, tiny_root, block_size, top_k):
    """Reference, by brute force: drop the image's bank rows, re-pick as many farthest-first among the patches
    of its block's other images that they were nearest to, score the image against that bank (the mean of its
    `top_k` farthest patches). Blocks of 32 patches hold two 32 px images (4 x 4 patches each)."""
    model, images = fit_tiny(
        PatchCore,
        tiny_root,
        32,
        coreset_ratio=0.1,
        projection_dim=None,
        coreset_block_size=block_size,
        score_top_k=top_k,
    )
    torch_model = model.model
    embedding = torch_model.embed(images)  # (6, D, h, w)
    patches = embedding.shape[2] * embedding.shape[3]
    features = embedding.permute(0, 2, 3, 1).half()
    blocks = torch_model.blocks(features)
    assert len(blocks) == (1 if block_size is None else 3)
    chosen = torch_model.select(features).sort().values  # the bank keeps its rows in image order
    features = features.flatten(0, 2).float()
    bank, owner, image_of = features[chosen], chosen // patches, torch.arange(6).repeat_interleave(patches)
    assert torch.equal(torch_model.memory_bank, bank)
    brute_force = []
    for left_out in range(6):
        block = torch.tensor(next(b for b in blocks if left_out in b))
        in_block, bank_in_block = torch.isin(image_of, block), torch.isin(owner, block)
        nearest_owner = owner[bank_in_block][torch.cdist(features, bank[bank_in_block]).argmin(1)]
        kept = bank[owner != left_out]
        candidates = features[(nearest_owner == left_out) & (image_of != left_out) & in_block]
        others = bank[bank_in_block & (owner != left_out)]  # none when the image owns the block's whole bank
        distances = (
            torch.cdist(candidates, others).amin(1) if len(others) else torch.full((len(candidates),), torch.inf)
        )
        refill = []
        for _ in range(min(int((owner == left_out).sum()), len(candidates))):
            refill.append(candidates[int(distances.argmax())])
            distances = torch.minimum(distances, torch.cdist(candidates, refill[-1][None])[:, 0])
        repaired = torch.cat([kept, *(r[None] for r in refill)])
        nearest = torch.cdist(features[image_of == left_out], repaired).amin(1)
        brute_force.append(float(nearest.topk(top_k).values.mean()))
    assert model.calibration.scores.tolist() == pytest.approx(sorted(brute_force), rel=1e-5)


@pytest.mark.parametrize("calibration", ["leave-one-out", "k-fold:3"])
def test_patchcore_scores_at_most_calibration_max_images(fit_tiny, tiny_root, calibration):
    model, _ = fit_tiny(PatchCore, tiny_root, 32, calibration=calibration, calibration_max_images=4)
    assert model.calibration.n == 4 and model.scored_images(6).tolist() == model.scored_images(6).sort().values.tolist()
    with pytest.raises(ValueError, match="calibration_max_images"):
        PatchCore(backbone="efficientnet_lite0", pretrained=False, calibration_max_images=0)


@pytest.mark.parametrize("cls", [PatchCore, PaDiM])
def test_k_fold_scores_every_train_image_once(fit_tiny, cls, tiny_root):
    model, _ = fit_tiny(cls, tiny_root, 32, calibration="k-fold:3", **({"n_features": 12} if cls is PaDiM else {}))
    assert model.calibration.method == "k-fold:3" and model.calibration.n == 6


def test_bad_calibration_method_is_named():
    with pytest.raises(ValueError, match="calibration must be"):
        PatchCore(backbone="efficientnet_lite0", pretrained=False, calibration="k-fold:1")


def test_q095_flags_at_most_ten_percent_of_unseen_normals(tmp_path):
    """80 train normals calibrate out of sample; 120 normals no step ever saw measure the promise."""
    root = write_synthetic(tmp_path, "MVTecAD", ["tile"], 80, 120, 2, image_size=64)
    dm = MVTecAD(root, "tile", image_size=64, num_workers=0, eval_batch_size=64)
    model = PatchCore(backbone="efficientnet_lite0", calibration_quantile=0.95)
    lightning = trainer()
    lightning.fit(model, datamodule=dm)
    lightning.test(model, datamodule=dm, verbose=False)
    result = result_collector(lightning).test_result
    normals = result.label == 0
    assert int(normals.sum()) == 120 and model.calibration.n == 80 and model.calibration.method == "leave-one-out"
    share_above = float((result.score[normals] > model.calibration.threshold).double().mean())
    assert share_above <= 0.10  # promised: at most 1 - q = 0.05 in expectation
    assert result.metrics["image_specificity"] == pytest.approx(1 - share_above)


def test_checkpoints_of_lit_anomaly_0_1_still_load(fit_tiny, tiny_root, tmp_path):
    """0.1 stored the threshold with quantile and count buffers and no calibration record or fitted size."""
    model, _ = fit_tiny(PatchCore, tiny_root, 32)
    lightning = trainer()
    lightning.strategy.connect(model)
    lightning.save_checkpoint(tmp_path / "new.ckpt")
    checkpoint = torch.load(tmp_path / "new.ckpt", weights_only=False)
    del checkpoint["calibration"], checkpoint["state_dict"]["fit_image_size"]
    checkpoint["state_dict"]["threshold_quantile"] = torch.tensor(0.9, dtype=torch.float64)
    checkpoint["state_dict"]["threshold_count"] = torch.tensor(7)
    torch.save(checkpoint, tmp_path / "old.ckpt")
    restored = PatchCore.load_from_checkpoint(tmp_path / "old.ckpt", pretrained=False)
    assert restored.calibrated_threshold == model.calibrated_threshold
    assert restored.calibration.n == 7 and restored.calibration.quantile == 0.9
    assert restored.fit_image_size.tolist() == [0, 0]  # unknown: any input size is accepted, as before
