"""The second round of hostile input: signals during predict, untrained checkpoints, contradicting flags,
output paths under files, a fit without test images, too few normals, read-only arrays."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lit_anomaly.cli import main
from lit_anomaly.data import Folder, MVTecAD, write_synthetic

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("round2"), "MVTecAD", ["carpet"], 8, 2, 2, 32)


def args_for(root, subcommand, *extra, model="PatchCore") -> list[str]:
    return [
        subcommand, "--model", model, "--model.backbone", "efficientnet_lite0", "--data", "MVTecAD",
        "--data.root", str(root), "--data.category", "carpet", "--data.image_size", "[32,32]",
        "--data.num_workers", "0", "--trainer.accelerator", "cpu", *extra,
    ]  # fmt: skip


def fails(capsys, args, status, *culprits) -> str:
    code = main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("lit-anomaly: error:")]
    assert code == status and len(lines) == 1, err[-2000:]
    for culprit in culprits:
        assert str(culprit) in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def checkpoint(root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fitted")
    assert main([*args_for(root, "fit"), "--trainer.default_root_dir", str(out)]) == 0
    return next(out.rglob("detector.ckpt"))


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_predict_after_the_batch_in_hand(root, checkpoint, tmp_path, signum, status):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    source = next((root / "carpet" / "test" / "good").glob("*.png"))
    for i in range(400):
        (incoming / f"{i:04d}.png").write_bytes(source.read_bytes())
    out = tmp_path / "out"
    args = ["predict", "--ckpt_path", str(checkpoint), "--data.predict_dir", str(incoming), "--data.num_workers", "0",
            "--data.eval_batch_size", "2", "--trainer.default_root_dir", str(out)]  # fmt: skip
    process = subprocess.Popen([sys.executable, "-m", "lit_anomaly", *args], stderr=subprocess.PIPE, text=True, env=ENV)
    lines = out / "predictions" / "predictions.jsonl"
    deadline = time.monotonic() + 120
    while not (lines.exists() and lines.read_text().count("\n") >= 4):
        assert time.monotonic() < deadline and process.poll() is None, "predict never wrote a line"
        time.sleep(0.05)
    process.send_signal(signum)
    err = process.communicate(timeout=120)[1]
    assert process.returncode == status and "Traceback" not in err, err[-2000:]
    text = lines.read_text()
    records = [json.loads(line) for line in text.splitlines()]  # every line whole
    assert text.endswith("\n") and 4 <= len(records) < 400 and len(records) % 2 == 0


def test_a_trained_detector_with_zero_epochs_is_refused_and_no_checkpoint_is_written(root, tmp_path, capsys):
    args = [*args_for(root, "fit", model="STFPM"), "--trainer.max_epochs", "0", "--trainer.default_root_dir"]
    fails(capsys, [*args, str(tmp_path)], 2, "--trainer.max_epochs 0", "not fitted")
    assert not list(tmp_path.rglob("*.ckpt"))
    code = main([*args_for(root, "fit+test", model="STFPM"), "--trainer.max_epochs", "0", "--run.save", "false"])
    err = capsys.readouterr().err
    assert code == 1 and "--trainer.max_epochs 0" in err and "Traceback" not in err


def test_predict_with_a_never_fitted_checkpoint_names_it_and_leaves_no_file(root, tmp_path, capsys):
    import torch

    from lit_anomaly.models import PatchCore
    from lit_anomaly.models.lifecycle import class_path

    detector = PatchCore(backbone="efficientnet_lite0", pretrained=False)
    unfitted = tmp_path / "unfitted.ckpt"
    hyper_parameters = {**detector.hparams, "_class_path": class_path(PatchCore)}
    data = {"root": str(root), "category": "carpet", "image_size": [32, 32]}
    classes = {"model": class_path(PatchCore), "data": class_path(MVTecAD)}
    state = {"state_dict": detector.state_dict(), "pytorch-lightning_version": "2.6.0"}
    torch.save({**state, "hyper_parameters": hyper_parameters, "classes": classes,
                "datamodule_hyper_parameters": data}, unfitted)  # fmt: skip
    args = ["predict", "--ckpt_path", str(unfitted), "--data.predict_dir", str(root / "carpet" / "test" / "good")]
    fails(capsys, [*args, "--trainer.default_root_dir", str(tmp_path / "out")], 2, unfitted, "never fitted")
    assert not (tmp_path / "out" / "predictions").exists()


def test_a_model_that_contradicts_the_checkpoint_is_refused(root, checkpoint, tmp_path, capsys):
    args = ["predict", "--ckpt_path", str(checkpoint), "--model", "PaDiM", "--data.predict_dir", str(root)]
    fails(capsys, [*args, "--trainer.default_root_dir", str(tmp_path)], 2, "--model PaDiM", "holds a PatchCore")


def test_fit_on_a_folder_without_test_images_and_test_says_what_is_missing(tmp_path, capsys):
    source = write_synthetic(tmp_path / "src", "Folder", ["custom"], 6, 2, 2, 32)
    (tmp_path / "line").mkdir()
    os.rename(source / "train", tmp_path / "line" / "train")
    common = ["--model", "PaDiM", "--model.backbone", "efficientnet_lite0", "--data", "Folder", "--data.root",
              str(tmp_path / "line"), "--data.image_size", "[32,32]", "--data.num_workers", "0"]  # fmt: skip
    assert main(["fit", *common, "--trainer.default_root_dir", str(tmp_path / "model")]) == 0
    assert list((tmp_path / "model").rglob("detector.ckpt"))
    with pytest.raises(ValueError, match="missing test folder"):
        Folder(tmp_path / "line", image_size=32, num_workers=0).test_dataloader()


def test_one_train_image_says_there_is_no_threshold_on_stderr(tmp_path, capsys):
    data = write_synthetic(tmp_path, "MVTecAD", ["carpet"], 1, 2, 2, 32)
    assert main([*args_for(data, "fit+test"), "--run.save", "false"]) == 0
    captured = capsys.readouterr()
    assert "there is no threshold, so every pred is null" in captured.err
    assert json.loads(captured.out)["per_category"]["carpet"]["threshold"] is None


def test_an_output_folder_under_a_file_is_named(root, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    args = [*args_for(root, "fit"), "--trainer.default_root_dir", str(blocker / "models")]
    fails(capsys, args, 2, "--trainer.default_root_dir", "is a file, not a folder")


def test_a_demo_cache_under_a_file_names_the_folder_and_the_flag(tmp_path):
    blocker = tmp_path / "home_is_a_file"
    blocker.write_text("x")
    env = {**ENV, "HOME": str(blocker), "XDG_CACHE_HOME": str(blocker / ".cache")}
    done = subprocess.run(
        [sys.executable, "-m", "lit_anomaly", "fit+test", "--config", "configs/demo.yaml", "--run.save", "false"],
        capture_output=True, text=True, env=env, timeout=300, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    lines = [line for line in done.stderr.splitlines() if line.startswith("lit-anomaly: error:")]
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert str(blocker) in lines[0] and "--data.root" in lines[0]


def test_read_only_arrays_reach_torch_without_a_warning(tmp_path):
    root = write_synthetic(tmp_path / "data", "MVTecAD", ["carpet"], 4, 2, 2, 40)
    Image.fromarray(np.zeros((40, 40), dtype=np.uint8)).convert("P").save(
        next((root / "carpet" / "train" / "good").glob("*.png"))
    )  # a palette image: Pillow's read-only array, not libspng's
    datamodule = MVTecAD(root, "carpet", image_size=32, num_workers=0, cache_dir=tmp_path / "cache")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):  # decoded, then served from the cache's memory maps
            for batch in datamodule.dataloader("train"):
                assert batch["image"].shape[-2:] == (32, 32)


@pytest.mark.parametrize("model", ["PatchCore", "PaDiM"])
def test_good_parts_identical_to_the_train_images_pass(tmp_path, capsys, model):
    """Calibration scores stored train features and test scores fresh ones: both must round alike (PaDiM keeps
    float32, PatchCore's threshold carries its float16 storage), and ties at the threshold pass."""
    data = write_synthetic(tmp_path / "data", "MVTecAD", ["tile"], 8, 4, 4, 64)
    train = sorted((data / "tile" / "train" / "good").glob("*.png"))
    for copy in [*train[1:], *(data / "tile" / "test" / "good").glob("*.png")]:
        copy.write_bytes(train[0].read_bytes())
    args = [*args_for(data, "fit+test", model=model), "--data.category", "tile", "--data.image_size", "[64,64]"]
    assert main([*args, "--model.calibration_quantile", "0.5", "--run.save", "false"]) == 0
    result = json.loads(capsys.readouterr().out)["per_category"]["tile"]
    assert result["metrics"]["image_specificity"] == 1.0 and result["threshold"] is not None
