"""Unified runs: one detector fitted on every category's normals, tested per category at each one's own threshold."""

import json

import pytest
import torch

from lit_anomaly.cli import main
from lit_anomaly.metrics import conformal_threshold
from lit_anomaly.models import PatchCore
from lit_anomaly.pipelines import run_benchmark
from lit_anomaly.reporting.compare import Run, comparison
from lit_anomaly.runtime.files import RunError

CATEGORIES = ("carpet", "tile")
PATCHCORE = {"class_path": "PatchCore", "init_args": {"backbone": "efficientnet_lite0"}}


def data_args(root, **extra):
    return {"class_path": "MVTecAD", "init_args": {"root": str(root), "image_size": 64, "num_workers": 0, **extra}}


def records(run_dir, category):
    lines = (run_dir / "categories" / category / "per_image.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def runs(mvtec_root, tmp_path_factory):
    """A unified PatchCore run over carpet and tile, and the per-category run of the same settings."""
    base = tmp_path_factory.mktemp("unified")
    folders = {"unified": base / "unified", "separate": base / "separate"}
    reports = {}
    for name, folder in folders.items():
        run = {"output_dir": str(folder), "unified": name == "unified", "checkpoints": name == "separate"}
        reports[name] = run_benchmark(PATCHCORE, data_args(mvtec_root), "all", {"accelerator": "cpu"}, run)
    return reports, folders


def test_one_detector_is_fitted_on_the_union_and_each_category_decides_at_its_own_threshold(runs):
    reports, folders = runs
    report, folder = reports["unified"], folders["unified"]
    unified = report["unified"]
    assert unified["categories"] == list(CATEGORIES) and unified["counts"] == {"train": 60, "calibration": 60}
    assert unified["threshold_provenance"]["scope"] == "class-agnostic: the normals of all 2 categories"
    assert (folder / "unified" / "detector.ckpt").is_file() and (folder / "tensorboard" / "unified").is_dir()
    detector = PatchCore.load_from_checkpoint(folder / "unified" / "detector.ckpt")
    calibration = detector.calibration
    assert unified["threshold"] == detector.calibrated_threshold == calibration.threshold
    # each category chosen in blocks of its own: the one bank is the union of the banks fitted one by one
    separate = [
        PatchCore.load_from_checkpoint(folders["separate"] / "categories" / c / "detector.ckpt") for c in CATEGORIES
    ]
    assert torch.equal(detector.model.memory_bank, torch.cat([d.model.memory_bank for d in separate]))
    # every train normal scored out of sample once: the class-agnostic scores are the categories' together
    together = torch.cat([calibration.categories[c].scores for c in CATEGORIES]).sort().values
    assert torch.equal(together, calibration.scores)
    for category in CATEGORIES:
        result, own = report["per_category"][category], calibration.categories[category]
        assert result["status"] == "ok" and result["timing"]["fit_s"] is None  # the fit is shared
        assert result["threshold_provenance"]["n"] == result["counts"]["train"] == 30
        rank_rule = conformal_threshold(own.scores, 0.995).threshold  # over the category's own scores alone
        assert result["threshold"] == own.threshold == pytest.approx(rank_rule + own.margin, rel=1e-6)
        assert result["threshold"] == detector.threshold_for(category)
        assert all(r["pred"] == int(r["score"] > result["threshold"]) for r in records(folder, category))
        # one bank for both: each category ranks its images about as well as its own detector does
        separate = reports["separate"]["per_category"][category]["metrics"]["image_auroc"]
        assert result["metrics"]["image_auroc"] == pytest.approx(separate, abs=0.05)
    assert "Unified: one detector fitted" in (folder / "report.html").read_text()


def test_predict_uses_the_class_agnostic_threshold_unless_a_category_is_named(runs, mvtec_root, tmp_path):
    reports, folders = runs
    checkpoint = str(folders["unified"] / "unified" / "detector.ckpt")
    incoming = str(mvtec_root / "tile" / "test" / "good")
    thresholds = {}
    for name, extra in (("any", []), ("tile", ["--data.category", "tile"])):
        args = ["predict", "--ckpt_path", checkpoint, "--data.predict_dir", incoming, *extra]
        assert main([*args, "--data.num_workers", "0", "--trainer.default_root_dir", str(tmp_path / name)]) == 0
        lines = (tmp_path / name / "predictions" / "predictions.jsonl").read_text().splitlines()
        thresholds[name] = {json.loads(line)["threshold"] for line in lines}
    assert thresholds["any"] == {reports["unified"]["unified"]["threshold"]}
    assert thresholds["tile"] == {reports["unified"]["per_category"]["tile"]["threshold"]}


def test_predict_on_a_dataset_tree_names_one_category(runs, capsys):
    _, folders = runs
    checkpoint = str(folders["unified"] / "unified" / "detector.ckpt")
    assert main(["predict", "--ckpt_path", checkpoint, "--data.num_workers", "0"]) == 2
    assert "--data.category carpet,tile names several categories" in capsys.readouterr().err


def test_compare_pairs_a_unified_run_with_separate_runs_per_category(runs):
    _, folders = runs
    result = comparison([Run.load(folders["separate"]), Run.load(folders["unified"])])
    assert result["categories"] == list(CATEGORIES) and result["runs"][1]["label"].endswith(", unified)")
    for category in CATEGORIES:
        first, test = result["paired_image_auroc"][category]
        assert first is None and test["images"] == 24  # DeLong's test on the category's 24 test images


def test_a_unified_run_killed_while_testing_resumes_without_fitting_again(runs, mvtec_root, tmp_path, monkeypatch):
    reports, _ = runs
    folder = tmp_path / "run"
    run_benchmark(PATCHCORE, data_args(mvtec_root), "all", {"accelerator": "cpu"}, {"output_dir": str(folder),
                  "unified": True})  # fmt: skip
    before = json.loads((folder / "report.json").read_text())
    (folder / "categories" / "tile" / "report.json").unlink()  # as a kill during tile's test leaves it
    del before["per_category"]["tile"]
    (folder / "report.json").write_text(json.dumps(before))

    def no_fit(*args, **kwargs):
        raise AssertionError("a resumed unified run fitted again")

    monkeypatch.setattr("lit_anomaly.pipelines.unified.fit_detector", no_fit)
    resumed = run_benchmark(PATCHCORE, data_args(mvtec_root), "all", {"accelerator": "cpu"}, {"resume": str(folder),
                            "unified": True})  # fmt: skip
    assert resumed["per_category"]["tile"]["status"] == "ok"
    assert resumed["unified"] == before["unified"]  # the fit's threshold and timing, as the first run wrote them
    first = reports["unified"]["per_category"]["tile"]
    assert resumed["per_category"]["tile"]["metrics"] == pytest.approx(first["metrics"])
    assert resumed["per_category"]["tile"]["threshold"] == first["threshold"]
    with pytest.raises(RunError, match=r"fitted on carpet,tile: resume it with --data\.category carpet,tile"):
        (folder / "categories" / "tile" / "report.json").unlink()
        run_benchmark(PATCHCORE, data_args(mvtec_root), "tile", {"accelerator": "cpu"}, {"resume": str(folder),
                      "unified": True})  # fmt: skip


def test_a_per_category_run_does_not_resume_as_a_unified_one(runs, mvtec_root):
    _, folders = runs
    with pytest.raises(RunError, match=r"run\.unified \(False there, True now\)"):
        run_benchmark(PATCHCORE, data_args(mvtec_root), "all", {"accelerator": "cpu"},
                      {"resume": str(folders["separate"]), "unified": True})  # fmt: skip


def test_a_trained_detector_trains_once_and_each_category_calibrates_on_its_own_hold_out(mvtec_root):
    model = {"class_path": "STFPM", "init_args": {"backbone": "efficientnet_lite0"}}
    report = run_benchmark(model, data_args(mvtec_root), "all", {"accelerator": "cpu", "max_steps": 4},
                           {"save": False, "unified": True})  # fmt: skip
    assert report["unified"]["threshold_provenance"]["method"] == "hold-out"
    assert report["unified"]["counts"] == {"train": 54, "calibration": 6}  # 10 % of each category's 30 held out
    for category in CATEGORIES:
        result = report["per_category"][category]
        assert result["status"] == "ok" and result["counts"]["train"] == 27
        assert result["threshold_provenance"]["n"] == 3 and result["threshold_provenance"]["method"] == "hold-out"


def test_an_exported_unified_detector_carries_every_categorys_threshold(runs, tmp_path, capsys):
    from lit_anomaly.runtime import Inferencer
    from lit_anomaly.runtime.bundle import BundleError

    reports, folders = runs
    checkpoint = str(folders["unified"] / "unified" / "detector.ckpt")
    assert main(["export", "--ckpt_path", checkpoint, "--format", "onnx", "--output", str(tmp_path / "bundle")]) == 0
    assert Inferencer(tmp_path / "bundle").threshold == reports["unified"]["unified"]["threshold"]
    for category in CATEGORIES:
        own = reports["unified"]["per_category"][category]["threshold"]
        assert Inferencer(tmp_path / "bundle", category=category).threshold == own
    with pytest.raises(BundleError, match=r"--category bottle: the bundle .* has no threshold for it"):
        Inferencer(tmp_path / "bundle", category="bottle")


@pytest.mark.parametrize("calibration", ["leave-one-out", "k-fold:3"])
def test_each_category_scores_its_own_share_of_calibration_images(mvtec_root, calibration):
    """`calibration_max_images` of the union left one category 13 of the 200 scored normals in 15."""
    arguments = {"backbone": "efficientnet_lite0", "calibration_max_images": 10, "calibration": calibration}
    model = {"class_path": "PatchCore", "init_args": arguments}
    report = run_benchmark(
        model, data_args(mvtec_root), "all", {"accelerator": "cpu"}, {"save": False, "unified": True}
    )
    assert report["unified"]["threshold_provenance"]["n"] == 20
    assert [report["per_category"][c]["threshold_provenance"]["n"] for c in CATEGORIES] == [10, 10]
