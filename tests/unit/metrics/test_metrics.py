import numpy as np
import pytest
import torch
from scipy import ndimage

from lit_anomaly.metrics import au_spro, aupro, image_metrics, pixel_auroc, pixel_auroc_and_aupro, resolve_quantile
from lit_anomaly.metrics.aupro import pixel_metrics_and_pro_curve
from lit_anomaly.metrics.classification import MAD_PARTS
from lit_anomaly.metrics.evaluation import evaluate_test
from lit_anomaly.metrics.intervals import bootstrap_intervals


def pairwise_auroc(scores, labels):
    """Probability that an anomalous score beats a normal one, ties counting half."""
    positives, negatives = scores[labels == 1], scores[labels == 0]
    wins = (positives[:, None] > negatives[None]).double() + 0.5 * (positives[:, None] == negatives[None]).double()
    return float(wins.mean())


def per_threshold_aupro(maps, masks, limit):
    """Slow reference: walk every distinct threshold, label regions per image, integrate with interpolation."""
    maps, masks = maps.numpy(), masks.numpy().astype(bool)
    regions = []
    for m, mask in zip(maps, masks, strict=False):
        labelled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(m, labelled == r) for r in range(1, n + 1)]
    negatives = maps[~masks]
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        fpr = (negatives >= t).mean()
        pro = np.mean([(m[region] >= t).mean() for m, region in regions])
        points.append((fpr, pro))
    fpr, pro = map(np.array, zip(*points, strict=False))
    keep = fpr <= limit
    x, y = list(fpr[keep]), list(pro[keep])
    if x[-1] < limit:
        j = keep.sum()
        y.append(pro[j - 1] + (pro[j] - pro[j - 1]) * (limit - fpr[j - 1]) / (fpr[j] - fpr[j - 1]))
        x.append(limit)
    return np.trapezoid(y, x) / limit


def test_image_auroc_matches_pairwise_reference_with_ties():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (200,), generator=generator)
    scores = torch.randint(0, 30, (200,), generator=generator).double() + labels * 3  # many ties
    metrics, notes = image_metrics(scores, labels, threshold=15.0)
    assert metrics["image_auroc"] == pytest.approx(
        pairwise_auroc(scores, labels), abs=1e-6
    )  # torchmetrics returns float32
    assert not notes


def test_metrics_use_raw_scores_without_sigmoid_saturation():
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    scores = torch.tensor([40.0, 41.0, 42.0, 43.0, 44.0, 45.0], dtype=torch.float64)  # sigmoid(>=40) == 1.0
    assert image_metrics(scores, labels, None)[0]["image_auroc"] == 1.0
    assert image_metrics(scores * 1e6 - 7, labels, None)[0]["image_auroc"] == 1.0


def test_threshold_metrics():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0, 4.0, 7.0, 8.0, 9.0])
    metrics, _ = image_metrics(scores, labels, threshold=5.0)
    # predicted anomalous: 6, 7, 8, 9 -> TP 3, FP 1, FN 1, TN 3
    assert metrics["image_precision"] == pytest.approx(0.75)
    assert metrics["image_recall"] == pytest.approx(0.75)
    assert metrics["image_specificity"] == pytest.approx(0.75)
    assert metrics["image_f1"] == pytest.approx(0.75)


def test_unlabelled_and_single_class_inputs_give_null_with_notes():
    metrics, notes = image_metrics(torch.tensor([1.0, 2.0]), torch.tensor([0, 0]), 1.5)
    assert metrics["image_auroc"] is None and "one class" in notes["image_auroc"]
    metrics, notes = image_metrics(torch.tensor([1.0]), torch.tensor([-1]), 1.5)
    assert all(v is None for v in metrics.values()) and notes


def test_pixel_auroc_matches_pairwise_reference():
    generator = torch.Generator().manual_seed(1)
    masks = torch.rand(3, 12, 12, generator=generator) > 0.8
    maps = torch.rand(3, 12, 12, generator=generator) + masks * 0.4
    assert pixel_auroc(maps, masks) == pytest.approx(pairwise_auroc(maps.flatten().double(), masks.flatten().long()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_matches_per_threshold_reference(seed):
    generator = torch.Generator().manual_seed(seed)
    masks = torch.zeros(4, 24, 24, dtype=torch.bool)
    masks[0, 2:6, 2:6] = True
    masks[0, 10:20, 12:14] = True
    masks[1, 5:7, 5:7] = True
    masks[1, 6:9, 7:9] = True  # touches the region above diagonally: one 8-connected region
    maps = torch.rand(4, 24, 24, generator=generator) + masks * torch.rand(4, 24, 24, generator=generator)
    maps = (maps * 20).round() / 20  # ties
    expected = per_threshold_aupro(maps, masks, 0.3)
    assert aupro(maps, masks, 0.3) == pytest.approx(expected, abs=1e-9)


def test_aupro_perfect_and_limits():
    masks = torch.zeros(2, 10, 10, dtype=torch.bool)
    masks[0, 3:6, 3:6] = True
    assert aupro(masks.double(), masks) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least one"):
        aupro(torch.rand(1, 5, 5), torch.zeros(1, 5, 5, dtype=torch.bool))


def test_spro_saturates_and_matches_reference():
    maps = torch.zeros(3, 10, 10, dtype=torch.float64)
    good = [2]
    maps[2] = torch.linspace(0, 0.5, 100).view(10, 10)
    defect = torch.zeros(10, 10, dtype=torch.bool)
    defect[0:4, 0:5] = True  # 20 pixels
    maps[0][defect] = torch.linspace(0.6, 1.0, 20, dtype=torch.float64)
    # saturation 10: half the defect detected already saturates the overlap
    full = au_spro(maps, [(0, defect, 10)], good, fpr_limit=0.05)
    assert full == pytest.approx(1.0)
    maps[0][defect] = torch.linspace(0.0, 0.4, 20, dtype=torch.float64)  # buried among good pixels
    low = au_spro(maps, [(0, defect, 10)], good, fpr_limit=0.05)
    # reference: at each good-pixel threshold, overlap = min(TP / 10, 1)
    thresholds = np.unique(np.concatenate([maps[2].numpy().ravel(), maps[0][defect].numpy()]))[::-1]
    points = [(0.0, 0.0)] + [
        ((maps[2] >= t).double().mean().item(), min((maps[0][defect] >= t).sum().item() / 10, 1.0)) for t in thresholds
    ]
    fpr, pro = map(np.array, zip(*points, strict=False))
    keep = fpr <= 0.05
    j = keep.sum()
    x = np.append(fpr[keep], 0.05)
    y = np.append(pro[keep], pro[j - 1] + (pro[j] - pro[j - 1]) * (0.05 - fpr[j - 1]) / (fpr[j] - fpr[j - 1]))
    assert low == pytest.approx(np.trapezoid(y, x) / 0.05, abs=1e-9)


def test_quantile_rules():
    assert resolve_quantile() == 0.995
    assert resolve_quantile(contamination=0.02) == pytest.approx(0.98)
    assert resolve_quantile(0.9) == 0.9
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="calibration_quantile"):
            resolve_quantile(bad)


def slow_ap(scores, labels):
    """Reference: every distinct threshold t, descending; recall gained times precision of `scores >= t`."""
    ap, recall_before = 0.0, 0.0
    for t in np.unique(scores)[::-1]:
        predicted = scores >= t
        true_positives = (predicted & (labels == 1)).sum()
        recall = true_positives / (labels == 1).sum()
        ap += (recall - recall_before) * true_positives / predicted.sum()
        recall_before = recall
    return ap


def slow_f1_max(scores, labels):
    """Reference: the best F1 of `scores >= t` over every distinct threshold t."""
    best = 0.0
    for t in np.unique(scores):
        predicted = scores >= t
        true_positives = (predicted & (labels == 1)).sum()
        best = max(best, 2 * true_positives / (predicted.sum() + (labels == 1).sum()))
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pixel_auroc_and_aupro_from_one_sort_match_the_references(seed):
    generator = torch.Generator().manual_seed(seed)
    maps = torch.randint(0, 40, (4, 12, 12), generator=generator).float() / 7  # many tied scores
    masks = torch.zeros(4, 12, 12, dtype=torch.bool)
    masks[0, 2:5, 2:6] = masks[1, 7:11, 1:3] = masks[1, 0:2, 9:12] = True
    maps = maps + 2.0 * masks  # defects score higher on average
    auroc, pro = pixel_auroc_and_aupro(maps, masks, 0.3)
    assert auroc == pytest.approx(pairwise_auroc(maps.flatten().double(), masks.flatten().long()), abs=1e-12)
    assert auroc == pytest.approx(pixel_auroc(maps, masks), abs=1e-6)  # torchmetrics, float32
    assert pro == pytest.approx(per_threshold_aupro(maps, masks, 0.3), abs=1e-9)
    assert pro == aupro(maps, masks, 0.3)
    published, _ = pixel_metrics_and_pro_curve(maps, masks, 0.3)  # the same sort gives AP and F1-max
    scores, labels = maps.flatten().double().numpy(), masks.flatten().long().numpy()
    assert published["pixel_ap"] == pytest.approx(slow_ap(scores, labels), abs=1e-12)
    assert published["pixel_f1_max"] == pytest.approx(slow_f1_max(scores, labels), abs=1e-12)
    assert (published["pixel_auroc"], published["pixel_aupro"]) == (auroc, pro)


def test_float32_maps_give_the_curves_of_float64_maps_with_negative_scores_and_signed_zeros():
    generator = torch.Generator().manual_seed(3)
    masks = torch.zeros(5, 16, 16, dtype=torch.bool)
    masks[1, 3:9, 4:10] = masks[3, 0:3, :] = True
    maps = (torch.randn(5, 16, 16, generator=generator) * 4).round() / 4 + masks  # ties around zero
    maps[0, :2], maps[0, 2:4] = 0.0, -0.0  # equal scores: one run, however their bits differ
    single = pixel_metrics_and_pro_curve(maps.float(), masks)
    double = pixel_metrics_and_pro_curve(maps.double(), masks)
    expected = pairwise_auroc(maps.flatten().double(), masks.flatten().long())
    assert single[0]["pixel_auroc"] == pytest.approx(expected, abs=1e-12)
    assert single[0] == pytest.approx(double[0], abs=1e-12)
    assert single[1] == double[1]


def test_image_f1_max_equals_the_best_threshold_and_mad_is_the_mean_of_its_seven_parts():
    generator = torch.Generator().manual_seed(4)
    labels = torch.tensor([0] * 12 + [1] * 9)
    scores = (torch.randn(21, generator=generator) + 1.2 * labels).round(decimals=1).double()  # ties
    metrics, _ = image_metrics(scores, labels, threshold=0.5)
    assert metrics["image_f1_max"] == pytest.approx(slow_f1_max(scores.numpy(), labels.numpy()), abs=1e-12)
    assert metrics["image_f1_max"] >= metrics["image_f1"]  # the calibrated threshold is one of the thresholds
    masks = torch.zeros(21, 8, 8, dtype=torch.bool)
    masks[12:, 2:5, 3:6] = True
    outputs = {
        "index": torch.arange(21), "score": scores, "label": labels, "has_mask": torch.ones(21, dtype=torch.bool),
        "map": torch.rand(21, 8, 8, generator=generator) + masks, "mask": masks,
        "image": torch.zeros(21, 3, 8, 8, dtype=torch.uint8),
    }  # fmt: skip
    result = evaluate_test(outputs, 0.5, 0.3)
    assert set(MAD_PARTS) <= set(result.metrics) and len(MAD_PARTS) == 7
    assert result.metrics["mad"] == pytest.approx(sum(result.metrics[k] for k in MAD_PARTS) / 7, abs=1e-15)
    low, high = bootstrap_intervals(scores.tolist(), labels.tolist(), 0.5, resamples=200)["image_f1_max"]
    assert low <= metrics["image_f1_max"] <= high
    outputs["has_mask"][:] = False  # no pixel metrics: no mAD either, with the reason
    unmasked = evaluate_test(outputs, 0.5, 0.3)
    assert unmasked.metrics["mad"] is None and "mad" in unmasked.notes
