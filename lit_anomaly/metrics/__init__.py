from .aupro import au_spro, aupro, pixel_auroc_and_aupro, pixel_metrics_and_pro_curve
from .calibration import DEFAULT_QUANTILE, Calibration, ThresholdCalibrator, conformal_threshold, resolve_quantile
from .classification import IMAGE_KEYS, PIXEL_KEYS, image_metrics, pixel_auroc, rank_scores

__all__ = [
    "DEFAULT_QUANTILE", "IMAGE_KEYS", "PIXEL_KEYS", "Calibration", "ThresholdCalibrator", "au_spro", "aupro",
    "conformal_threshold", "image_metrics", "pixel_auroc", "pixel_auroc_and_aupro",
    "pixel_metrics_and_pro_curve", "rank_scores", "resolve_quantile",
]  # fmt: skip
