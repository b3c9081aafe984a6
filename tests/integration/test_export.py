"""Export every detector to ONNX and OpenVINO, run the bundle without torch, and compare with `lit-anomaly predict`."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lit_anomaly.cli import main
from lit_anomaly.data import write_synthetic
from lit_anomaly.models import PatchCore
from lit_anomaly.models.lifecycle import class_path
from lit_anomaly.runtime import ImageError, Inferencer
from lit_anomaly.runtime.outputs import images_below

DETECTORS = ("PatchCore", "PaDiM", "STFPM", "ReverseDistillation")
FORMATS = ("onnx", "openvino")
FITTED = 64
BLOCK_TORCH = (
    "import sys\n"
    "for name in ('torch', 'torchvision', 'pytorch_lightning', 'lightning_fabric', 'torchmetrics', 'timm'):\n"
    "    sys.modules[name] = None  # any import of them fails\n"
    "from lit_anomaly.runtime.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def infer_without_torch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH, *args], capture_output=True, text=True, timeout=300)


def error_line(stderr: str, prog: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith(f"{prog}: error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A category to fit on, and 20 images to check and predict: the synthetic test images at 96 px, six of
    them again at the fitted size, one grey, and one JPEG stored sideways with an EXIF orientation."""
    root = tmp_path_factory.mktemp("export")
    data = write_synthetic(root / "data", "MVTecAD", ["tile"], 12, 8, 4, 96)
    images = root / "images"
    shutil.copytree(data / "tile" / "test", images)
    sources = sorted(images.rglob("*.png"))
    for i, source in enumerate(sources[:6]):
        with Image.open(source) as image:
            image.resize((FITTED, FITTED)).save(images / f"fitted_{i}.png")
    with Image.open(sources[6]) as image:
        image.convert("L").save(images / "grey.png")
        exif = Image.Exif()
        exif[0x0112] = 6
        image.transpose(Image.Transpose.ROTATE_90).save(images / "sideways.jpg", exif=exif.tobytes(), quality=95)
    assert len(images_below(images)) >= 20
    return root


@pytest.fixture(scope="module")
def fitted(workspace) -> dict[str, Path]:
    """One checkpoint per detector, as `lit-anomaly fit` writes it."""
    checkpoints = {}
    for name in DETECTORS:
        folder = workspace / "fit" / name
        args = [
            "fit", "--model", name, "--model.backbone", "efficientnet_lite0", "--data", "MVTecAD",
            "--data.root", str(workspace / "data"), "--data.category", "tile", "--data.image_size", str(FITTED),
            "--data.num_workers", "0", "--trainer.default_root_dir", str(folder), "--trainer.max_epochs", "2",
        ]  # fmt: skip
        if name == "PatchCore":
            args += ["--model.reweight", "true"]  # the reweighting is in the graph too
        assert main(args) == 0
        checkpoints[name] = next(folder.rglob("detector.ckpt"))
    return checkpoints


@pytest.fixture(scope="module")
def predicted(workspace, fitted) -> dict[str, Path]:
    """`lit-anomaly predict`'s folder per detector."""
    folders = {}
    for name, checkpoint in fitted.items():
        root = workspace / "predict" / name
        args = ["predict", "--ckpt_path", str(checkpoint), "--data.predict_dir", str(workspace / "images")]
        assert main([*args, "--trainer.default_root_dir", str(root), "--data.num_workers", "0"]) == 0
        folders[name] = root / "predictions"
    return folders


@pytest.mark.parametrize("format_name", FORMATS)
@pytest.mark.parametrize("name", DETECTORS)
def test_an_export_scores_like_predict_without_torch(workspace, fitted, predicted, name, format_name, capsys):
    bundle = workspace / "bundles" / f"{name}_{format_name}"
    args = ["export", "--ckpt_path", str(fitted[name]), "--format", format_name, "--output", str(bundle)]
    assert main([*args, "--check", str(workspace / "images")]) == 0
    check = json.loads(capsys.readouterr().out)
    count = len(images_below(workspace / "images"))
    assert check["passed"] and check["images"] == count >= 20 and check["decisions_differ"] == 0
    assert check["score"]["max_rel"] <= 1e-4 and set(check["latency_ms_per_image"]) == {"pytorch", format_name}
    metadata = json.loads((bundle / "metadata.json").read_text())
    assert metadata["input"]["size"] == [FITTED, FITTED] and metadata["threshold"]["provenance"]["n"] > 0
    assert metadata["detector"]["class"] == name and set(metadata["files"]) == {p.name for p in bundle.iterdir()} - {
        "metadata.json"
    }

    output = workspace / "infer" / f"{name}_{format_name}"
    done = infer_without_torch("--bundle", str(bundle), "--input", str(workspace / "images"), "--output", str(output))
    assert done.returncode == 0, done.stderr[-2000:]
    ours = [json.loads(line) for line in (output / "predictions.jsonl").read_text().splitlines()]
    theirs = [json.loads(line) for line in (predicted[name] / "predictions.jsonl").read_text().splitlines()]
    assert [r["path"] for r in ours] == [r["path"] for r in theirs] and len(ours) == count
    assert [r["pred"] for r in ours] == [r["pred"] for r in theirs]  # the same decisions
    assert [r["score"] for r in ours] == pytest.approx([r["score"] for r in theirs], rel=1e-4)
    maps = sorted(p.relative_to(output) for p in output.rglob("*.tiff"))
    assert maps == sorted(p.relative_to(predicted[name]) for p in predicted[name].rglob("*.tiff"))
    for relative in maps:  # at each image's own size, as a viewer shows it
        ours_map, theirs_map = (np.asarray(Image.open(folder / relative)) for folder in (output, predicted[name]))
        assert ours_map.shape == theirs_map.shape
        assert np.abs(ours_map - theirs_map).max() <= 1e-3 * np.abs(theirs_map).max()
    sideways = next(p for p in maps if "sideways" in p.name)
    assert np.asarray(Image.open(output / sideways)).shape == (96, 96)


@pytest.mark.parametrize("format_name", FORMATS)
def test_fp16_bundles_are_judged_by_their_measured_tolerance_and_by_every_decision(
    workspace, fitted, format_name, capsys
):
    bundle = workspace / "bundles" / f"fp16_{format_name}"
    args = ["export", "--ckpt_path", str(fitted["PatchCore"]), "--format", format_name, "--output", str(bundle)]
    code = main([*args, "--precision", "fp16", "--check", str(workspace / "images")])
    check = json.loads(capsys.readouterr().out)
    assert check["score_tolerance_rel"] == 2e-2 and check["score"]["max_rel"] <= 2e-2  # float16 weights move scores
    assert check["passed"] == (check["decisions_differ"] == 0) and code == (0 if check["passed"] else 1)
    if check["passed"]:
        assert json.loads((bundle / "metadata.json").read_text())["precision"] == "fp16"
    else:  # a part that fp16 would decide otherwise on these images: no bundle
        assert not bundle.exists() and check["differing_files"]


def test_the_python_runtime_gives_scores_maps_and_decisions(workspace, fitted):
    bundle = workspace / "bundles" / "python"
    assert main(["export", "--ckpt_path", str(fitted["PaDiM"]), "--format", "onnx", "--output", str(bundle)]) == 0
    inferencer = Inferencer(bundle)
    paths = sorted((workspace / "images").glob("*.png"))[:3]
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    from_files, from_arrays = inferencer.predict(paths), inferencer.predict(arrays)
    assert [p.score for p in from_files] == pytest.approx([p.score for p in from_arrays], rel=1e-6)
    assert all(p.pred == int(p.score > inferencer.threshold) for p in from_files)
    assert from_files[0].anomaly_map.shape == arrays[0].shape[:2] and from_files[0].path == str(paths[0])
    with pytest.raises(ImageError, match="4 channels"):
        inferencer.predict(np.zeros((64, 64, 4), dtype=np.uint8))


# ---- bad input: one line, nothing half-written --------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle(workspace, fitted) -> Path:
    path = workspace / "bundles" / "bad_input_source"
    assert main(["export", "--ckpt_path", str(fitted["PatchCore"]), "--format", "onnx", "--output", str(path)]) == 0
    return path


def broken_copy(bundle: Path, tmp_path: Path, damage) -> Path:
    copy = shutil.copytree(bundle, tmp_path / "bundle")
    damage(copy)
    return copy


def other_format_version(folder: Path) -> None:
    metadata = json.loads((folder / "metadata.json").read_text())
    (folder / "metadata.json").write_text(json.dumps({**metadata, "bundle_format": 99}))


def flipped_byte(folder: Path) -> None:
    data = bytearray((folder / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "model.onnx").write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "culprit", "says"),
    [
        (other_format_version, "metadata.json", "bundle format 99"),
        (flipped_byte, "model.onnx", "does not match the SHA-256"),
        (lambda folder: (folder / "model.onnx").unlink(), "model.onnx", "is missing from the bundle"),
    ],
    ids=["format-version", "hash", "missing-file"],
)
def test_a_damaged_bundle_is_refused_in_one_line(workspace, bundle, tmp_path, damage, culprit, says):
    damaged = broken_copy(bundle, tmp_path, damage)
    output = tmp_path / "out"
    done = infer_without_torch("--bundle", str(damaged), "--input", str(workspace / "images"), "--output", str(output))
    line = error_line(done.stderr, "lit-anomaly-infer")
    assert done.returncode == 2 and culprit in line and says in line
    assert not output.exists()


def test_an_unreadable_image_is_a_line_and_the_rest_are_scored(workspace, bundle, tmp_path):
    images = shutil.copytree(workspace / "images" / "good", tmp_path / "images")
    (images / "broken.png").write_bytes(b"not a png")
    done = infer_without_torch("--bundle", str(bundle), "--input", str(images), "--output", str(tmp_path / "out"))
    assert done.returncode == 1 and "1 of" in error_line(done.stderr, "lit-anomaly-infer")
    lines = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    broken = [line for line in lines if line["path"].endswith("broken.png")]
    assert len(broken) == 1 and broken[0]["score"] is None and "broken.png" in broken[0]["error"]
    assert all(line["score"] is not None for line in lines if line not in broken)


def test_a_checkpoint_that_was_never_fitted_is_refused(tmp_path, capsys):
    detector = PatchCore(backbone="efficientnet_lite0", pretrained=False)
    checkpoint = tmp_path / "unfitted.ckpt"
    torch.save(
        {"state_dict": detector.state_dict(), "pytorch-lightning_version": "2.6.0",
         "hyper_parameters": dict(detector.hparams), "classes": {"model": class_path(PatchCore), "data": None}},
        checkpoint,
    )  # fmt: skip
    args = ["export", "--ckpt_path", str(checkpoint), "--format", "onnx", "--output", str(tmp_path / "bundle")]
    assert main(args) == 2
    line = error_line(capsys.readouterr().err, "lit-anomaly")
    assert "never fitted" in line and str(checkpoint) in line and not (tmp_path / "bundle").exists()


def test_a_format_whose_runtime_is_not_installed_names_the_extra(fitted, tmp_path, capsys, monkeypatch):
    import lit_anomaly.runtime.engines as engines

    real = engines.importlib.import_module

    def without_openvino(name, *args):
        if name == "openvino":
            raise ImportError("No module named 'openvino'")
        return real(name, *args)

    monkeypatch.setattr(engines.importlib, "import_module", without_openvino)
    args = ["export", "--ckpt_path", str(fitted["PaDiM"]), "--format", "openvino", "--output", str(tmp_path / "b")]
    assert main(args) == 2
    line = error_line(capsys.readouterr().err, "lit-anomaly")
    assert "pip install 'lit-anomaly-runtime[openvino]'" in line and not (tmp_path / "b").exists()


def test_a_failed_check_leaves_no_bundle(workspace, fitted, tmp_path, capsys, monkeypatch):
    from lit_anomaly.runtime.inferencer import Inferencer as RuntimeInferencer

    score = RuntimeInferencer.score
    monkeypatch.setattr(
        RuntimeInferencer, "score", lambda self, images: (score(self, images)[0] + 1.0, score(self, images)[1])
    )
    output = tmp_path / "bundle"
    args = ["export", "--ckpt_path", str(fitted["PaDiM"]), "--format", "onnx", "--output", str(output)]
    assert main([*args, "--check", str(workspace / "images")]) == 1
    captured = capsys.readouterr()
    assert not json.loads(captured.out)["passed"] and "failed its check" in error_line(captured.err, "lit-anomaly")
    assert not output.exists() and not any(p.name.startswith(".bundle.partial") for p in tmp_path.iterdir())


def test_an_output_folder_that_holds_something_is_refused(fitted, tmp_path, capsys):
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "keep.txt").write_text("mine")
    args = ["export", "--ckpt_path", str(fitted["PaDiM"]), "--format", "onnx", "--output", str(tmp_path / "bundle")]
    assert main(args) == 2
    assert "not an empty folder" in error_line(capsys.readouterr().err, "lit-anomaly")
    assert [p.name for p in (tmp_path / "bundle").iterdir()] == ["keep.txt"]


def test_the_line_pc_distribution_holds_the_runtime_alone(tmp_path):
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(root / "packaging" / "runtime")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    import zipfile

    names = zipfile.ZipFile(next(tmp_path.glob("lit_anomaly_runtime-*.whl"))).namelist()
    modules = {n for n in names if n.endswith(".py")}
    assert modules == {"lit_anomaly/__init__.py"} | {
        f"lit_anomaly/runtime/{p.name}" for p in (root / "lit_anomaly" / "runtime").glob("*.py")
    }
    requires = next(n for n in names if n.endswith("METADATA"))
    metadata = zipfile.ZipFile(next(tmp_path.glob("*.whl"))).read(requires).decode()
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist")]
    assert not any("torch" in line for line in requires) and any("onnxruntime" in line for line in requires)
