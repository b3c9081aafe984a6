import csv
import json

import pytest
import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger

from lit_anomaly.data import MVTecAD, MVTecLOCO, write_synthetic
from lit_anomaly.models import PatchCore
from lit_anomaly.pipelines import run_benchmark


@pytest.fixture(scope="module")
def loco_root(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("loco"), "MVTecLOCO", ["juice_bottle"], 15, 6, 8, 64)


def test_python_api_returns_what_report_json_holds(mvtec_root, tmp_path, lightning_records):
    model = PatchCore(backbone="efficientnet_lite0")
    data = MVTecAD(mvtec_root, "tile", image_size=64, num_workers=0)
    report = run_benchmark(model=model, data=data, trainer={"accelerator": "cpu"}, run={"output_dir": str(tmp_path)})
    assert lightning_records and not [r for r in lightning_records if "Tip" in r.getMessage()]  # Lightning's adverts
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert report["categories"] == ["tile"] and report["model"] == "PatchCore" and report["dataset"] == "MVTecAD"
    assert report["config"]["model"]["init_args"]["backbone"] == "efficientnet_lite0"
    assert not model.fitted  # the caller's instance is copied, never fitted in place
    by_type = report["per_category"]["tile"]["metrics_by_defect_type"]
    assert set(by_type) == {"scratch", "stain"} and by_type["scratch"]["image_auroc"] is not None


def test_a_detector_fit_in_python_predicts_from_the_command_line(mvtec_root, tmp_path, capsys):
    """The checkpoint of a detector the Python call built failed `lit-anomaly predict` with "--model: Option
    'backbone' is not accepted": LightningCLI reads a checkpoint's arguments as those of the class it names."""
    from lit_anomaly.cli import main

    model = {"class_path": "PatchCore", "init_args": {"backbone": "efficientnet_lite0", "layers": (2, 3)}}
    data = {"class_path": "MVTecAD", "init_args": {"root": str(mvtec_root), "image_size": 64, "num_workers": 0}}
    run = {"output_dir": str(tmp_path / "fit"), "checkpoints": True}
    run_benchmark(model=model, data=data, category="tile", trainer={"accelerator": "cpu"}, run=run)
    checkpoint = tmp_path / "fit" / "categories" / "tile" / "detector.ckpt"
    assert PatchCore.load_from_checkpoint(checkpoint).hparams.layers == (2, 3)
    incoming = str(mvtec_root / "tile" / "test" / "good")
    args = ["predict", "--ckpt_path", str(checkpoint), "--data.predict_dir", incoming, "--data.num_workers", "0"]
    assert main([*args, "--trainer.default_root_dir", str(tmp_path)]) == 0, capsys.readouterr().err[-2000:]
    assert len((tmp_path / "predictions" / "predictions.jsonl").read_text().splitlines()) == 12


def test_every_category_starts_from_the_same_detector(mvtec_root):
    """With random weights, a category of an `all` run fits what a run of that category alone fits."""

    def thresholds(category):
        pl.seed_everything(0)  # what the command does before it builds the detector
        report = run_benchmark(
            model={"class_path": "PatchCore", "init_args": {"backbone": "efficientnet_lite0", "pretrained": False}},
            data={"class_path": "MVTecAD", "init_args": {"root": str(mvtec_root), "image_size": 64, "num_workers": 0}},
            category=category,
            trainer={"accelerator": "cpu"},
            run={"save": False},
        )
        return {name: result["threshold"] for name, result in report["per_category"].items()}

    both = thresholds("all")
    assert both["tile"] == thresholds("tile")["tile"] and both["carpet"] != both["tile"]


def test_a_logger_of_the_callers_holds_each_category_under_its_name_at_increasing_steps(mvtec_root, tmp_path):
    logger = CSVLogger(tmp_path / "logs", name="run")
    report = run_benchmark(
        model=PatchCore(backbone="efficientnet_lite0"),
        data=MVTecAD(mvtec_root, "all", image_size=64, num_workers=0),
        trainer={"accelerator": "cpu", "logger": logger},
        run={"save": False},
    )
    with open(tmp_path / "logs" / "run" / "version_0" / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    steps = [int(row["step"]) for row in rows]
    assert steps == sorted(set(steps))  # loggers that want increasing steps keep every category
    for category in ("carpet", "tile"):
        logged = [float(row[f"{category}/test/image_auroc"]) for row in rows if row[f"{category}/test/image_auroc"]]
        assert logged == pytest.approx([report["per_category"][category]["metrics"]["image_auroc"]])


def test_a_fit_or_test_on_part_of_the_category_says_so_and_counts_what_the_metrics_are_over(mvtec_root):
    report = run_benchmark(
        model=PatchCore(backbone="efficientnet_lite0"),
        data=MVTecAD(mvtec_root, "tile", image_size=64, train_batch_size=8, eval_batch_size=8, num_workers=0),
        trainer={"accelerator": "cpu", "limit_train_batches": 2, "limit_test_batches": 2},
        run={"save": False},
    )
    category = report["per_category"]["tile"]
    assert category["counts"]["test"] == 16 and category["counts"]["test_anomalous"] == 4  # 12 good come first
    assert category["notes"]["test_images"].startswith("metrics over 16 of 24 test images")
    assert category["notes"]["train_batches"].startswith("fit on 2 of 4 train batches")


def test_loco_reports_spro_and_logical_structural_separately(loco_root, tmp_path):
    report = run_benchmark(
        model={"class_path": "PatchCore", "init_args": {"backbone": "efficientnet_lite0"}},
        data={"class_path": "MVTecLOCO", "init_args": {"root": str(loco_root), "image_size": 64, "num_workers": 0}},
        category="all",
        trainer={"accelerator": "cpu"},
        run={"save": False},
    )
    result = report["per_category"]["juice_bottle"]
    assert result["status"] == "ok", result["error"]
    assert 0.0 < result["metrics"]["pixel_spro"] <= 1.0
    assert set(result["metrics_by_defect_type"]) == {"logical_anomalies", "structural_anomalies"}
    assert result["counts"] == {"train": 15, "calibration": 18, "test": 14, "test_anomalous": 8}
    # every train normal scored out of sample, plus LOCO's own validation/good scored by the final model
    assert result["threshold_provenance"]["method"] == "leave-one-out+validation"


def test_loco_saturation_areas(loco_root):
    dm = MVTecLOCO(loco_root, "juice_bottle", image_size=64, num_workers=0)
    defects = dm.spro_defects((64, 64))
    anomalous = [i for i, s in enumerate(dm.samples("test")) if s.label == 1]
    assert sorted(defects) == anomalous and all(len(found) == 2 for found in defects.values())
    for (relative_mask, relative), (absolute_mask, absolute) in defects.values():
        assert relative == int(relative_mask.sum())  # saturation_threshold 1.0, relative
        assert absolute == min(400 * 64 * 64 / 64**2, float(absolute_mask.sum()))  # 400 px absolute, same scale
