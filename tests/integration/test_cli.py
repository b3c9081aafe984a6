import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import lit_anomaly
from lit_anomaly.cli import main
from lit_anomaly.data import write_synthetic
from lit_anomaly.models import PatchCore
from lit_anomaly.reporting import HEADLINE_METRICS

REPORT_KEYS = {
    "schema_version", "lit_anomaly_version", "timestamp_utc", "dataset", "model", "categories", "per_category",
    "mean_metrics", "std_metrics", "run_dir", "wall_s", "config", "environment",
}  # fmt: skip
CATEGORY_KEYS = {
    "status", "error", "threshold", "threshold_provenance", "metrics", "metric_intervals", "curves", "hard_cases",
    "counts", "timing",
}  # fmt: skip
RECORD_KEYS = {"index", "path", "category", "defect_type", "label", "score", "threshold", "pred"}


@pytest.fixture(scope="module")
def cli_root(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("cli"), "MVTecAD", ["carpet", "tile"], 12, 4, 4, 64)


def args_for(root, *extra, model="PatchCore", data="MVTecAD") -> list[str]:
    return [
        "fit+test", "--model", model, "--model.backbone", "efficientnet_lite0", "--data", data,
        "--data.root", str(root), "--data.image_size", "[64,64]", "--data.num_workers", "0",
        "--trainer.accelerator", "cpu", *extra,
    ]  # fmt: skip


def run_cli(capsys, args) -> tuple[int, dict | None, str]:
    code = main(args)
    captured = capsys.readouterr()
    document = json.loads(captured.out) if captured.out.strip() else None
    return code, document, captured.err


def test_single_category_writes_every_artifact(cli_root, tmp_path, capsys, lightning_records):
    out = tmp_path / "run"
    code, report, err = run_cli(capsys, args_for(cli_root, "--data.category", "carpet", "--run.output_dir", str(out)))
    assert code == 0
    assert lightning_records and not [r for r in lightning_records if "Tip" in r.getMessage()]  # Lightning's adverts
    assert set(report) == REPORT_KEYS and report["categories"] == ["carpet"]
    assert json.loads((out / "report.json").read_text()) == report
    category = report["per_category"]["carpet"]
    assert set(category) >= CATEGORY_KEYS and category["status"] == "ok"
    assert set(category["metrics"]) == set(HEADLINE_METRICS) and category["metrics"]["image_auroc"] >= 0.9
    assert category["counts"] == {"train": 12, "calibration": 12, "test": 8, "test_anomalous": 4}
    provenance = category["threshold_provenance"]  # q = 0.995 needs 199 normals: the largest of 12 scores
    assert {k: provenance[k] for k in ("quantile", "method", "n", "rank", "normals_needed")} == {
        "quantile": 0.995, "method": "leave-one-out", "n": 12, "rank": 12, "normals_needed": 199,
    }  # fmt: skip
    assert provenance["false_alarm_bound"] == pytest.approx(1 / 13)
    warnings = [line for line in err.splitlines() if line.startswith("lit-anomaly: warning: carpet:")]
    assert len(warnings) == 1 and "199" in warnings[0]
    assert set(category["timing"]) == {"fit_s", "calibrate_s", "test_s"}
    assert json.loads((out / "categories" / "carpet" / "report.json").read_text())["threshold"] == category["threshold"]
    records = [
        json.loads(line) for line in (out / "categories" / "carpet" / "per_image.jsonl").read_text().splitlines()
    ]
    assert len(records) == 8 and set(records[0]) == RECORD_KEYS
    assert sorted(r["index"] for r in records) == list(range(8))
    assert all(r["pred"] == int(r["score"] >= r["threshold"]) for r in records)
    config = yaml.safe_load((out / "config.yaml").read_text())  # the fit+test config: reusable with --config
    assert config["model"]["init_args"]["backbone"] == "efficientnet_lite0"
    assert config["data"]["init_args"]["category"] == "carpet" and config["run"]["output_dir"] == str(out)
    assert report["environment"]["packages"]["torch"]
    assert (out / "report.html").stat().st_size > 0 and "carpet" in (out / "report.html").read_text()
    assert {c["file"] for c in category["hard_cases"]} == {
        str(p.relative_to(out / "categories" / "carpet"))
        for p in (out / "categories" / "carpet" / "hard_cases").iterdir()
    }
    events = EventAccumulator(str(out / "tensorboard" / "carpet"), size_guidance={"images": 0, "histograms": 0})
    tags = events.Reload().Tags()
    assert {"test/image_auroc", "test/pixel_aupro", "test/threshold", "threshold"} <= set(tags["scalars"])
    assert {"calibration/scores", "test/scores_normal", "test/scores_anomalous"} <= set(tags["histograms"])
    assert {"test/highest_scoring_normals", "test/lowest_scoring_anomalies"} <= set(tags["images"])


def test_all_categories_aggregate_and_output_copy(cli_root, tmp_path, capsys):
    out, copy = tmp_path / "run", tmp_path / "summary.json"
    extra = ["--run.output_dir", str(out), "--run.output", str(copy), "--run.checkpoints", "true"]
    code, report, _ = run_cli(capsys, args_for(cli_root, "--data.category", "all", *extra))
    assert code == 0 and report["categories"] == ["carpet", "tile"]
    values = [report["per_category"][c]["metrics"]["image_ap"] for c in ("carpet", "tile")]
    mean = sum(values) / 2
    assert report["mean_metrics"]["image_ap"] == pytest.approx(mean)
    assert report["std_metrics"]["image_ap"] == pytest.approx(abs(values[0] - mean))  # population std of two
    assert json.loads(copy.read_text()) == report
    for category in ("carpet", "tile"):
        assert len((out / "categories" / category / "per_image.jsonl").read_text().splitlines()) == 8
        detector = PatchCore.load_from_checkpoint(out / "categories" / category / "detector.ckpt", pretrained=False)
        assert detector.calibrated_threshold == pytest.approx(report["per_category"][category]["threshold"])


def test_a_list_of_categories_runs_those_in_its_order(cli_root, capsys):
    args = args_for(cli_root, "--data.category", "tile, carpet,tile", "--run.save", "false")
    args += ["--trainer.max_epochs", "3"]
    code, report, err = run_cli(capsys, args)
    assert code == 0 and report["categories"] == ["tile", "carpet"]
    assert all(result["status"] == "ok" for result in report["per_category"].values())
    unused = "lit-anomaly: warning: PatchCore fits in one pass over train: --trainer.max_epochs 3 is not used"
    assert err.count(unused) == 1  # once for the run, not silently, not per category
    assert re.search(r"^finished\b.* 2/2 ", err, re.M)  # the progress line's last state: no stale name


def test_default_run_folder_is_named_and_never_reused(cli_root, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = run_cli(capsys, args_for(cli_root, "--data.category", "tile", "--run.per_image_jsonl", "false"))[1]
    second = run_cli(capsys, args_for(cli_root, "--data.category", "tile", "--run.save", "false"))[1]
    run_dir = Path(first["run_dir"])
    assert run_dir.parent == Path("runs") and run_dir.name.endswith("_MVTecAD_PatchCore")
    assert not (tmp_path / run_dir / "categories" / "tile" / "per_image.jsonl").exists()
    assert second["run_dir"] is None and len(list((tmp_path / "runs").iterdir())) == 1


def test_folder_dataset(tmp_path, capsys):
    root = write_synthetic(tmp_path / "line3", "Folder", ["custom"], 12, 4, 4, 64)
    code, report, _ = run_cli(capsys, args_for(root, "--run.output_dir", str(tmp_path / "run"), data="Folder"))
    assert code == 0 and report["categories"] == ["custom"]
    assert report["per_category"]["custom"]["counts"]["test"] == 8


def test_resume_skips_finished_categories(cli_root, tmp_path, capsys):
    out = tmp_path / "run"
    run_cli(capsys, args_for(cli_root, "--data.category", "all", "--run.output_dir", str(out)))
    kept = out / "categories" / "carpet" / "report.json"
    kept_time = kept.stat().st_mtime_ns
    shutil.rmtree(out / "categories" / "tile")  # as if the run died during tile
    code, report, _ = run_cli(capsys, args_for(cli_root, "--data.category", "all", "--run.resume", str(out)))
    assert code == 0 and set(report["per_category"]) == {"carpet", "tile"}
    assert kept.stat().st_mtime_ns == kept_time
    assert (out / "categories" / "tile" / "per_image.jsonl").exists()
    code, _, error = run_cli(
        capsys, args_for(cli_root, "--data.category", "all", "--run.resume", str(out), model="PaDiM")
    )
    assert code == 2 and "MVTecAD/PatchCore run, not MVTecAD/PaDiM" in error


def test_failing_category_is_recorded_and_others_run(cli_root, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(cli_root, root)
    broken = root / "carpet" / "test" / "good" / "002.png"
    original = broken.read_bytes()
    broken.write_bytes(b"not a png")
    out = tmp_path / "run"
    code, report, _ = run_cli(capsys, args_for(root, "--data.category", "all", "--run.output_dir", str(out)))
    assert code == 1
    assert report["per_category"]["carpet"]["status"] == "failed"
    assert str(broken) in report["per_category"]["carpet"]["error"]
    assert report["per_category"]["tile"]["status"] == "ok"
    assert report["mean_metrics"]["image_auroc"] == report["per_category"]["tile"]["metrics"]["image_auroc"]
    assert json.loads((out / "categories" / "carpet" / "report.json").read_text())["status"] == "failed"
    assert "Traceback" in (out / "categories" / "carpet" / "traceback.txt").read_text()  # for a bug report
    broken.write_bytes(original)
    code, report, _ = run_cli(capsys, args_for(root, "--data.category", "all", "--run.resume", str(out)))
    assert code == 0 and report["per_category"]["carpet"]["status"] == "ok"
    assert not (out / "categories" / "carpet" / "traceback.txt").exists()  # the retry's success replaces it


def test_trainer_callbacks_from_the_command_line_run_and_the_saved_config_reruns(cli_root, tmp_path, capsys):
    # our defaults switch checkpointing and the progress bar off, and Lightning had appended its own ModelCheckpoint
    # to the callback list each category's Trainer copies; Timer's default is an Enum member YAML could not write
    callbacks = ["Timer", "ModelCheckpoint", "RichProgressBar"]
    flags = [f"--trainer.callbacks+=pytorch_lightning.callbacks.{name}" for name in callbacks]
    out = tmp_path / "run"
    code, report, err = run_cli(
        capsys, args_for(cli_root, "--data.category", "carpet", "--run.output_dir", str(out), *flags)
    )
    assert code == 0 and report["per_category"]["carpet"]["status"] == "ok", err
    assert "Testing" in err  # the progress bar asked for
    saved = yaml.safe_load((out / "config.yaml").read_text())["trainer"]["callbacks"]
    assert [c["class_path"].rsplit(".", 1)[1] for c in saved] == callbacks
    assert saved[0]["init_args"]["interval"] == "step"
    rerun = ["fit+test", "--config", str(out / "config.yaml"), "--run.output_dir", str(tmp_path / "rerun")]
    code, again, err = run_cli(capsys, rerun)
    assert code == 0 and again["per_category"]["carpet"]["metrics"] == report["per_category"]["carpet"]["metrics"], err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": "PatchKore"}, "unknown --model 'PatchKore'; valid: PatchCore, PaDiM"),
        ({"data": "MVTec"}, "unknown --data 'MVTec'; valid: MVTecAD, MVTecAD2"),
        ({"extra": ["--data.category", "bottel"]}, "unknown MVTecAD category 'bottel'; valid: carpet, tile"),
        ({"extra": ["--data.category", "tile,bottel"]}, "unknown MVTecAD category 'bottel'; valid: carpet, tile"),
        ({"root": "/nonexistent/mvtec", "extra": ["--data.category", "all"]}, "/nonexistent/mvtec does not exist"),
        ({"data": "Folder", "extra": ["--data.category", "all"]}, "not supported by Folder"),
        ({"extra": ["--data.category", "tile", "--run.output", "/nonexistent/dir/r.json"]}, "/nonexistent/dir"),
        ({"extra": ["--data.category", "tile", "--model.calibration_quantile", "1.5"]}, "calibration_quantile"),
        (
            {"extra": ["--data.category", "tile", "--data.train_batch_size", "0"]},
            "--data.train_batch_size must be a positive number",
        ),
        (
            {"extra": ["--data.category", "tile", "--data.num_workers", "-1"]},
            "--data.num_workers must be 0 (decode in-process) or more",
        ),
        (
            {"extra": ["--data.category", "tile", "--model.blur_sigma", "-1"]},
            "--model.blur_sigma must be 0 (no blur) or more px, got -1.0",
        ),
    ],
)
def test_bad_input_is_one_clear_line(cli_root, capsys, change, message):
    args = args_for(
        change.get("root", cli_root), *change.get("extra", []), model=change.get("model", "PatchCore"),
        data=change.get("data", "MVTecAD"),
    )  # fmt: skip
    code, document, error = run_cli(capsys, args)
    assert code == 2 and document is None
    line = next(line for line in error.splitlines() if line.startswith("lit-anomaly: error:"))
    assert message in line
    assert "Traceback" not in error


def test_fit_then_predict_writes_scores_and_submission_maps(tmp_path, capsys):
    root = write_synthetic(tmp_path / "ad2", "MVTecAD2", ["can"], 12, 4, 4, 64)
    common = ["--model", "PatchCore", "--model.backbone", "efficientnet_lite0", "--data", "MVTecAD2"]
    common += ["--data.root", str(root), "--data.category", "can", "--data.image_size", "[32,32]"]
    common += ["--data.num_workers", "0", "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path)]
    assert main(["fit", *common]) == 0
    checkpoint = next(tmp_path.rglob("*.ckpt"))
    assert main(["predict", *common, "--ckpt_path", str(checkpoint), "--data.predict_split", "test_private"]) == 0
    capsys.readouterr()
    out = tmp_path / "predictions"
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(line["threshold"] > 0 and line["pred"] in (0, 1) for line in lines)
    from PIL import Image

    maps = sorted((out / "anomaly_images" / "can" / "test_private").iterdir())
    assert [p.name for p in maps] == ["000_regular.tiff", "001_regular.tiff", "002_regular.tiff"]
    with Image.open(maps[0]) as anomaly_map:
        assert anomaly_map.mode == "F" and anomaly_map.size == (64, 64)  # the image's own size
    binary = out / "anomaly_images_thresholded" / "can" / "test_private" / "000_regular.png"
    with Image.open(binary) as thresholded:
        assert set(thresholded.getdata()) <= {0, 255}


def test_predict_on_the_line_needs_only_the_checkpoint_and_the_images(cli_root, tmp_path, capsys, monkeypatch):
    root = shutil.copytree(cli_root, tmp_path / "data")
    run = tmp_path / "run"
    code, report, _ = run_cli(
        capsys, args_for(root, "--data.category", "tile", "--run.output_dir", str(run), "--run.checkpoints", "true")
    )
    assert code == 0
    checkpoint = shutil.copy(run / "categories" / "tile" / "detector.ckpt", tmp_path / "detector.ckpt")
    retest = ["test", "--ckpt_path", str(checkpoint), "--data.num_workers", "0", "--trainer.default_root_dir"]
    assert main([*retest, str(tmp_path / "retest")]) == 0  # on the category it was fit on, from the checkpoint alone
    assert str(report["per_category"]["tile"]["threshold"]) in capsys.readouterr().err  # Lightning's table
    incoming = shutil.copytree(root / "tile" / "test" / "good", tmp_path / "incoming")
    shutil.rmtree(root)  # the line's PC has the detector, not the training data
    monkeypatch.chdir(tmp_path)
    args = ["predict", "--ckpt_path", str(checkpoint), "--data.predict_dir", str(incoming)]
    assert main([*args, "--trainer.accelerator", "cpu", "--data.num_workers", "0"]) == 0, capsys.readouterr().err
    lines = [json.loads(line) for line in (tmp_path / "predictions" / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and {line["threshold"] for line in lines} == {report["per_category"]["tile"]["threshold"]}
    assert not (tmp_path / "lightning_logs").exists()  # a logger's empty version_N folder for every call, otherwise
    code, _, error = run_cli(capsys, args)  # again, into the same folder: the first call's lines were replaced
    assert code == 2 and f"predictions folder {tmp_path / 'predictions'} is not empty" in error
    assert len((tmp_path / "predictions" / "predictions.jsonl").read_text().splitlines()) == 4
    older = torch.load(checkpoint, weights_only=True)
    del older["classes"]  # as lit-anomaly 0.1 wrote them
    torch.save(older, tmp_path / "older.ckpt")
    code, _, error = run_cli(capsys, ["predict", "--ckpt_path", str(tmp_path / "older.ckpt"), *args[3:]])
    assert code == 2 and "older.ckpt does not name its detector and dataset classes" in error


def test_offline_download_failure_is_one_actionable_line(cli_root, capsys, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    args = args_for(cli_root, "--data.category", "tile")
    args[args.index("efficientnet_lite0")] = "resnet18"
    code, _, error = run_cli(capsys, args)
    assert code == 2
    assert "lit-anomaly: error: cannot download pretrained weights for 'resnet18'" in error
    assert "--model.weights_path FILE" in error and "Traceback" not in error


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_missing_accelerator_is_one_line(cli_root, capsys):
    code, _, error = run_cli(capsys, args_for(cli_root, "--data.category", "tile", "--trainer.accelerator", "gpu"))
    assert code == 2 and "lit-anomaly: error: No supported gpu backend found" in error and "Traceback" not in error


def test_command_freezes_the_import_time_objects_keeps_freed_memory_and_returns_the_exit_status(monkeypatch):
    import gc

    import lit_anomaly.cli
    import lit_anomaly.utils.process
    from lit_anomaly.__main__ import run

    calls = []  # the policy itself is tested on a loader worker (test_data); not applied to the test process
    monkeypatch.setattr(lit_anomaly.utils.process, "keep_freed_memory", lambda: calls.append("policy"))
    monkeypatch.setattr(lit_anomaly.cli, "main", lambda: calls.append("main") or 3)
    try:
        assert run() == 3
        assert calls == ["policy", "main"]
        assert gc.isenabled() and gc.get_freeze_count() > 10_000  # torch and Lightning: what exit no longer traces
    finally:
        gc.unfreeze()


def test_command_exits_with_the_status_after_the_exit_handlers_and_flushes_its_output():
    script = (
        "import atexit, sys\n"
        "atexit.register(print, 'exit handler ran')\n"  # to stdout, a pipe here: block-buffered
        "sys.argv = ['lit-anomaly', 'fit+test', '--model', 'NoSuchDetector']\n"
        "from lit_anomaly.__main__ import command\n"
        "command()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 2 and "lit-anomaly: error:" in done.stderr and "NoSuchDetector" in done.stderr
    assert done.stdout == "exit handler ran\n"


def test_help_names_the_command_however_it_was_launched(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(Path(lit_anomaly.__file__).with_name("__main__.py")), "fit+test", "--help"])
    with pytest.raises(SystemExit) as exit_:
        main()  # `python -m lit_anomaly` puts __main__.py in argv[0], which argparse would print
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("usage: lit-anomaly [options] fit+test")
    with pytest.raises(SystemExit):  # a named subcommand builds only its own parser; the top level lists all
        main(["--help"])
    assert capsys.readouterr().out.startswith("usage: lit-anomaly [-c CONFIG] {fit,validate,test,predict,fit+test}")
