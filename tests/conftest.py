import logging
import os
import warnings
from pathlib import Path

import pytest
import torch

from lit_anomaly.data import write_synthetic

os.environ.setdefault("PYTHONWARNINGS", "ignore")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
warnings.filterwarnings("ignore")

FAMILY_CATEGORIES = {
    "MVTecAD": ["bottle", "carpet"],
    "MVTecAD2": ["can"],
    "MVTecLOCO": ["juice_bottle"],
    "BTAD": ["01", "02"],
    "VisA": ["candle", "pcb1"],
    "Folder": ["custom"],
}


@pytest.fixture(scope="session")
def family_roots(tmp_path_factory) -> dict[str, Path]:
    """One small tree per family: 10 train, 4 good and 4 defective test images per category, 48 px."""
    base = tmp_path_factory.mktemp("families")
    return {
        family: write_synthetic(base / family, family, categories, 10, 4, 4, image_size=48)
        for family, categories in FAMILY_CATEGORIES.items()
    }


@pytest.fixture(scope="session")
def mvtec_root(tmp_path_factory) -> Path:
    """Two MVTec-layout categories big enough for detectors to learn: 30 train, 12 + 12 test, 128 px."""
    return write_synthetic(tmp_path_factory.mktemp("mvtec"), "MVTecAD", ["carpet", "tile"], 30, 12, 12, 128)


@pytest.fixture
def fit_tiny():
    """fit(cls, root, size, **kwargs): a detector fitted (random backbone weights, seeded; q = 0.5; batches of 4)
    on the generated category "tile" under `root` at `size` px, and its six train images as it saw them."""
    import pytorch_lightning as pl

    from lit_anomaly.callbacks import ResultCollector
    from lit_anomaly.data import MVTecAD

    def fit(cls, root: Path, size: int, **kwargs):
        torch.manual_seed(0)  # the random backbone weights
        dm = MVTecAD(root, "tile", image_size=size, num_workers=0, train_batch_size=4)
        model = cls(backbone="efficientnet_lite0", pretrained=False, calibration_quantile=0.5, **kwargs)
        pl.Trainer(
            accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[ResultCollector()],
        ).fit(model, datamodule=dm)  # fmt: skip
        dataset = dm.dataloader("train").dataset
        images = torch.stack([torch.as_tensor(dataset[i]["image"]) for i in range(6)]).float()
        return model, images / 255

    return fit


@pytest.fixture
def lightning_records():
    """What Lightning logs (it does not propagate to the root logger, so caplog misses it)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("pytorch_lightning").addHandler(handler)
    yield records
    logging.getLogger("pytorch_lightning").removeHandler(handler)
