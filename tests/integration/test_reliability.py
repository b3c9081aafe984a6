"""Bad input and faults: one line on stderr naming the culprit, the right exit status, no traceback,
finished results intact. Concurrency, interruption and resume run real processes."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pytorch_lightning.utilities.exceptions import SIGTERMException

from lit_anomaly.cli import main
from lit_anomaly.data import write_synthetic
from lit_anomaly.pipelines.trainer import save_checkpoint
from lit_anomaly.runtime.files import write_atomic
from lit_anomaly.utils.process import stopping_on_signals

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("bad"), "MVTecAD", ["carpet", "tile"], 10, 2, 2, 32)


def base_args(root, *extra, model="PatchCore", data="MVTecAD", subcommand="fit+test") -> list[str]:
    return [
        subcommand, "--model", model, "--model.backbone", "efficientnet_lite0", "--data", data,
        "--data.root", str(root), "--data.image_size", "[32,32]", "--data.num_workers", "0",
        "--trainer.accelerator", "cpu", *extra,
    ]  # fmt: skip


def run(capsys, args) -> tuple[int, str, dict | None]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.err, json.loads(captured.out) if captured.out.strip() else None


def error_line(err: str) -> str:
    """The one error line; nothing looks like a traceback."""
    assert "Traceback" not in err, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("lit-anomaly: error:")]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


def fails(capsys, args, status, *culprits) -> str:
    code, err, out = run(capsys, args)
    line = error_line(err)
    assert code == status, err[-2000:]
    assert out is None
    for culprit in culprits:
        assert str(culprit) in line, line
    return line


# ---- flags and config ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "culprits"),
    [
        (["--model.calibration_quantile", "abc"], ["--model.calibration_quantile", "abc", "float"]),
        (["--model.calibration_quantile", "1.5"], ["--model.calibration_quantile", "1.5"]),
        (["--model.calibration_quantile", "0.9", "--model.contamination", "0.05"], ["quantile", "contamination"]),
        (["--model.calibration", "k-fold:1"], ["--model.calibration", "k-fold:1"]),
        (["--model.coreset_ratio", "0"], ["--model.coreset_ratio"]),
        (["--model.reweight", "true", "--model.num_neighbors", "1"], ["--model.num_neighbors", "got 1"]),
        (["--data.image_size", "[8,8]"], ["--data.image_size", "[8, 8]"]),
        (["--data.image_size", "abc"], ["--data.image_size", "abc"]),
        (["--data.limit_test", "0"], ["--data.limit_test"]),
        (["--data.limit_train", "x"], ["--data.limit_train", "x"]),
        (["--data.calibration_fraction", "1.5"], ["--data.calibration_fraction"]),
        (["--data.max_image_pixels", "0"], ["--data.max_image_pixels"]),
        (["--model.backbone", "no_such_net"], ["no_such_net"]),
    ],
)  # fmt: skip
def test_bad_flags_fail_before_anything_runs(root, tmp_path, capsys, extra, culprits):
    out = tmp_path / "run"
    fails(capsys, base_args(root, "--data.category", "carpet", "--run.output_dir", str(out), *extra), 2, *culprits)
    assert not out.exists()  # nothing was created, nothing was fitted


def test_unknown_names_root_and_category(root, tmp_path, capsys):
    fails(capsys, [*base_args(root), "--model", "PatchKor"], 2, "PatchKor", "PatchCore")
    fails(capsys, base_args(tmp_path / "nowhere", "--data.category", "carpet"), 2, tmp_path / "nowhere")
    fails(capsys, base_args(root, "--data.category", "bottle"), 2, "bottle", "carpet")
    line = fails(capsys, ["test", "--model", "PatchCore"], 2, "--data required")  # was "TypeError: the following..."
    assert "Error" not in line


def test_malformed_yaml_names_the_file_and_line(root, tmp_path, capsys):
    config = tmp_path / "broken.yaml"
    config.write_text("model:\n  class_path: PatchCore\n  init_args: [\n")
    fails(capsys, ["fit+test", "--config", str(config)], 2, config, "line 4")


@pytest.mark.parametrize(
    ("content", "says"), [("", "is empty"), ("# only a comment\n", "is empty"), ("- a\n", "holds a list")]
)
def test_a_config_without_settings_names_the_file(tmp_path, capsys, content, says):
    config = tmp_path / "config.yaml"
    config.write_text(content)
    fails(capsys, ["fit+test", "--config", str(config)], 2, config, says)


def test_weights_path_that_is_not_weights(root, tmp_path, capsys):
    text = tmp_path / "weights.txt"
    text.write_text("101\n")
    args = base_args(root, "--data.category", "carpet", "--model.pretrained", "false", "--run.save", "false")
    fails(capsys, [*args, "--model.weights_path", str(text)], 2, text, "not a readable PyTorch state dict")
    fails(capsys, [*args, "--model.weights_path", str(tmp_path / "absent.pth")], 2, "absent.pth", "does not exist")


def test_verbose_adds_the_traceback(root, capsys):
    code, err, _ = run(
        capsys, [*base_args(root, "--data.category", "carpet"), "--model.coreset_ratio", "0", "--verbose"]
    )
    assert code == 2 and "Traceback" in err and err.rstrip().splitlines()[-1].startswith("lit-anomaly: error:")


# ---- output paths --------------------------------------------------------------------------
def test_output_dir_that_is_a_file_or_not_empty_or_unwritable(root, tmp_path, capsys):
    args = base_args(root, "--data.category", "carpet")
    file = tmp_path / "file.txt"
    file.write_text("keep me")
    fails(capsys, [*args, "--run.output_dir", str(file)], 2, file, "is a file")
    fails(capsys, [*args, "--run.output_dir", str(file / "run")], 2, file / "run")  # a file where a folder must be
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    fails(capsys, [*args, "--run.output_dir", str(busy)], 2, busy, "--run.resume")
    assert file.read_text() == "keep me" and (busy / "notes.txt").read_text() == "mine"


def test_output_copy_that_is_a_folder_fails_before_fitting(root, tmp_path, capsys):
    out = tmp_path / "run"
    args = base_args(root, "--data.category", "carpet", "--run.output_dir", str(out))
    fails(capsys, [*args, "--run.output", str(tmp_path)], 2, "--run.output", tmp_path, "folder")
    fails(capsys, [*args, "--run.output", str(tmp_path / "no" / "x.json")], 2, "--run.output", "does not exist")
    assert not out.exists()


def test_output_copy_that_cannot_be_written_after_the_run_says_where_the_results_are(
    root, tmp_path, capsys, monkeypatch
):
    import lit_anomaly.reporting.run_folder as run_folder

    copy = tmp_path / "copy.json"

    def disk_full_for_the_copy(path, data):
        if Path(path) == copy:
            raise OSError(28, "No space left on device")
        write_atomic(path, data)

    monkeypatch.setattr(run_folder, "write_atomic", disk_full_for_the_copy)
    out = tmp_path / "run"
    args = base_args(root, "--data.category", "carpet", "--run.output_dir", str(out), "--run.output", str(copy))
    fails(capsys, args, 2, "--run.output", "No space left on device", f"the run's results are in {out}")
    assert json.loads((out / "report.json").read_text())["per_category"]["carpet"]["status"] == "ok"


# ---- checkpoints ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fitted")
    args = [*base_args(root, "--data.category", "carpet", subcommand="fit"), "--trainer.default_root_dir", str(out)]
    assert main(args) == 0
    return next(out.rglob("detector.ckpt"))


def bad_checkpoints(folder: Path, good: Path) -> dict[str, Path]:
    folder.mkdir()
    (folder / "empty.ckpt").write_bytes(b"")
    (folder / "random.ckpt").write_bytes(np.random.default_rng(0).bytes(4096))
    (folder / "truncated.ckpt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    torch.save({"weights": torch.zeros(3)}, folder / "foreign.ckpt")
    (folder / "folder.ckpt").mkdir()

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {folder / 'payload-ran'}",))

    (folder / "pickle.ckpt").write_bytes(pickle.dumps({"state_dict": Payload(), "pytorch-lightning_version": "2"}))
    return {p.stem: p for p in folder.iterdir() if p.suffix == ".ckpt"} | {"missing": folder / "missing.ckpt"}


@pytest.mark.parametrize("subcommand", ["test", "predict"])
def test_bad_checkpoints_are_refused_by_name(root, tmp_path, capsys, checkpoint, subcommand):
    args = base_args(root, "--data.category", "carpet", subcommand=subcommand)
    for name, path in bad_checkpoints(tmp_path / "ckpts", checkpoint).items():
        line = fails(capsys, [*args, "--ckpt_path", str(path), "--trainer.default_root_dir", str(tmp_path)], 2, path)
        assert name in line
    assert not (tmp_path / "ckpts" / "payload-ran").exists()  # weights_only: the pickle never ran


def test_test_without_a_fitted_detector(root, capsys, tmp_path):
    args = base_args(root, "--data.category", "carpet", subcommand="test")
    fails(capsys, [*args, "--trainer.default_root_dir", str(tmp_path)], 2, "not fitted", "--ckpt_path")


def test_predict_at_another_image_size_than_fitted_is_refused(root, tmp_path, capsys, checkpoint):
    args = base_args(root, "--data.category", "carpet", subcommand="predict")
    args[args.index("[32,32]")] = "[48,48]"
    args += ["--ckpt_path", str(checkpoint), "--trainer.default_root_dir", str(tmp_path)]
    fails(capsys, args, 2, "--data.image_size [48, 48]", "[32, 32]")


def test_checkpoint_writes_are_atomic(tmp_path):
    target = tmp_path / "detector.ckpt"
    target.write_bytes(b"previous")

    class FullDisk:
        is_global_zero = True

        def save_checkpoint(self, path, weights_only=None):
            Path(path).write_bytes(b"half a checkp")
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        save_checkpoint(FullDisk(), target)
    assert target.read_bytes() == b"previous"

    def crash(path: Path) -> None:
        path.write_text('{"half": ')
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_atomic(tmp_path / "report.json", crash)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["detector.ckpt"]  # no half files, no leftovers


# ---- silent wrong results ----------------------------------------------------------------------
def test_metrics_that_cannot_be_computed_are_null_with_a_note(root, tmp_path, capsys):
    code, _, report = run(
        capsys, base_args(root, "--data.category", "all", "--data.limit_test", "1", "--run.save", "false")
    )
    assert code == 0
    for result in report["per_category"].values():
        assert result["metrics"]["image_specificity"] is None and result["metrics"]["image_auroc"] is None
        assert "no normal test images" in result["notes"]["image_specificity"]
    assert report["mean_metrics"]["image_specificity"] is None  # means skip nulls, never average in a 0


@pytest.fixture
def odd_masks(tmp_path) -> Path:
    data = write_synthetic(tmp_path / "odd", "MVTecAD", ["carpet"], 10, 2, 3, 32)
    masks = sorted((data / "carpet" / "ground_truth").rglob("*.png"))
    Image.open(masks[0]).resize((16, 16)).save(masks[0])  # another size than its image
    Image.new("L", (32, 32)).save(masks[1])  # all zero
    masks[2].unlink()  # missing
    return data


def test_mask_oddities_are_noted_and_warned_once(odd_masks, capsys):
    code, err, report = run(capsys, base_args(odd_masks, "--data.category", "carpet", "--run.save", "false"))
    assert code == 0
    notes = report["per_category"]["carpet"]["notes"]
    assert {"masks_resized", "masks_missing", "masks_empty"} <= set(notes)
    assert (
        str(odd_masks) in notes["masks_resized"]
        and "1 anomalous images have no ground-truth mask" in notes["masks_missing"]
    )
    warnings = [line for line in err.splitlines() if line.startswith("lit-anomaly: warning: carpet:")]
    assert sum("resized" in w for w in warnings) == sum("no ground-truth" in w for w in warnings) == 1
    assert sum("all-zero" in w for w in warnings) == 1


# ---- predict keeps going -----------------------------------------------------------------------
def test_predict_reports_bad_files_and_keeps_unique_names(root, tmp_path, capsys, checkpoint):
    incoming = tmp_path / "incoming"
    (incoming / "sub").mkdir(parents=True)
    good = next((root / "carpet" / "test" / "good").iterdir())
    for name in ("a.png", "sub/a.png", "b.png", "b.jpg"):
        Image.open(good).convert("RGB").save(incoming / name)
    (incoming / "broken.png").write_bytes(good.read_bytes()[:200])
    Image.new("RGB", (3000, 3000)).save(incoming / "huge.png")  # a small file declaring 9 Mpx
    out = tmp_path / "out"
    args = base_args(root, "--data.category", "carpet", subcommand="predict")
    args += ["--ckpt_path", str(checkpoint), "--data.predict_dir", str(incoming), "--data.max_image_pixels", "1000000"]
    args += ["--trainer.default_root_dir", str(out)]
    line = fails(capsys, args, 1, "2 of 6 images could not be read")
    lines = [json.loads(x) for x in (out / "predictions" / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 6
    failed = {Path(x["path"]).name: x["error"] for x in lines if x["score"] is None}
    assert set(failed) == {"broken.png", "huge.png"} and "max_image_pixels" in failed["huge.png"]
    maps = sorted(p.relative_to(out / "predictions" / "anomaly_images") for p in (out / "predictions").rglob("*.tiff"))
    assert [str(p) for p in maps] == ["carpet/predict/a.tiff", "carpet/predict/b.jpg.tiff", "carpet/predict/b.png.tiff",
                                      "carpet/predict/sub/a.tiff"]  # fmt: skip
    assert "see" in line


def test_user_names_never_leave_the_run_folder(tmp_path, capsys):
    data = write_synthetic(tmp_path / "line", "Folder", ["custom"], 10, 2, 2, 32)
    out = tmp_path / "deep" / "run"
    code, _, _ = run(
        capsys, base_args(data, "--data.category", "../../escape", "--run.output_dir", str(out), data="Folder")
    )
    assert code == 0
    assert not (tmp_path / "escape").exists() and not (tmp_path / "deep" / "escape").exists()
    assert all(out in p.parents for p in out.rglob("*"))
    assert [p.name for p in (out / "tensorboard").iterdir()] == ["..-..-escape"]  # one plain folder name


# ---- run folders ---------------------------------------------------------------------------------
def test_files_get_the_users_umask(root, tmp_path, capsys):
    previous = os.umask(0o022)
    try:
        out = tmp_path / "run"
        assert run(capsys, base_args(root, "--data.category", "carpet", "--run.output_dir", str(out)))[0] == 0
    finally:
        os.umask(previous)
    for name in ("report.json", "config.yaml", "categories/carpet/report.json", "categories/carpet/per_image.jsonl"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name


def test_resume_refuses_settings_that_change_results(root, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(capsys, base_args(root, "--data.category", "carpet", "--run.output_dir", str(out)))[0] == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    args = base_args(root, "--data.category", "all", "--run.resume", str(out))
    changed = [*args, "--model.calibration_quantile", "0.9"]
    changed[changed.index("[32,32]")] = "[48,48]"
    fails(capsys, changed, 2, "image_size", "calibration_quantile", "--run.resume_force")
    assert {p: p.read_bytes() for p in before} == before  # nothing rewritten
    fails(
        capsys, base_args(root, "--data.category", "all", "--run.resume", str(tmp_path / "none")), 2, "does not exist"
    )
    other = base_args(root, "--data.category", "all", "--run.resume", str(out), model="PaDiM")
    fails(capsys, other, 2, "MVTecAD/PatchCore", "PaDiM")
    code, _, report = run(capsys, args)  # same settings, one more category
    assert code == 0 and set(report["per_category"]) == {"carpet", "tile"}
    assert (out / "config.yaml").read_bytes() == before[out / "config.yaml"]


def subprocess_run(args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lit_anomaly", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=ENV, **kwargs,
    )  # fmt: skip


def wait_for(path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_two_runs_into_one_folder_the_second_is_refused(root, tmp_path):
    out = tmp_path / "run"
    args = base_args(root, "--data.category", "all", "--run.output_dir", str(out))
    first = subprocess_run(args)
    wait_for(out / ".lock")
    second = subprocess_run(args)
    err = second.communicate(timeout=300)[1]
    assert second.returncode == 2 and "lit-anomaly: error:" in err and str(out) in err and "Traceback" not in err
    assert first.wait(timeout=300) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["per_category"]) == {"carpet", "tile"}


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_resumes_to_the_same_report(root, tmp_path, how):
    """SIGTERM (a scheduler's stop) within a Trainer's loop ended the command with status 0 and no output."""
    out = tmp_path / "run"
    args = base_args(root, "--data.category", "all", "--run.output_dir", str(out))
    process = subprocess_run(args)
    wait_for(out / "report.json")  # written before the first category is fitted
    if how != signal.SIGKILL:
        wait_for(out / "categories" / "carpet" / "report.json")
    process.send_signal(how)
    _, err = process.communicate(timeout=300)
    assert process.returncode == {signal.SIGKILL: -9, signal.SIGINT: 130, signal.SIGTERM: 143}[how], err[-2000:]
    if how != signal.SIGKILL:
        assert "Traceback" not in err and "--run.resume" in err
    finished = json.loads((out / "report.json").read_text())
    assert set(finished["per_category"]) <= {"carpet"}
    resumed = subprocess_run(base_args(root, "--data.category", "all", "--run.resume", str(out)))
    stdout, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    report = json.loads(stdout)
    assert set(report["per_category"]) == {"carpet", "tile"}
    assert all(r["status"] == "ok" for r in report["per_category"].values())


@pytest.mark.parametrize(("signum", "stop"), [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, SIGTERMException)])
def test_a_signal_that_a_c_extension_disguises_still_stops_the_loop(signum, stop):
    """matplotlib's C++ reported Ctrl+C during a figure as its own TypeError: a failed category, or exit 1."""
    before = signal.getsignal(signal.SIGTERM)

    def drawing():  # what pybind11 does with an exception raised while it converts arguments
        try:
            os.kill(os.getpid(), signum)
            time.sleep(5)
        except BaseException as error:
            raise TypeError("affine_transform(): incompatible function arguments") from error

    with pytest.raises(stop), stopping_on_signals() as stopped:
        drawing()
    assert stopped == [signum] and signal.getsignal(signal.SIGTERM) is before


def test_config_yaml_of_a_run_reruns_it(root, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(capsys, base_args(root, "--data.category", "carpet", "--run.output_dir", str(out)))[0] == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    config["run"]["output_dir"] = str(tmp_path / "again")
    (tmp_path / "again.yaml").write_text(yaml.safe_dump(config))
    assert run(capsys, ["fit+test", "--config", str(tmp_path / "again.yaml")])[0] == 0
    shutil.rmtree(tmp_path / "again")
