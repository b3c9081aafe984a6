"""The high-resolution mode end to end: configs/highres.yaml as written, maps at each image's own size in
predict (MVTec AD 2's submission layout), and an export that scores like the detector."""

import json
from pathlib import Path

import pytest
from PIL import Image

from lit_anomaly.cli import main
from lit_anomaly.data import write_synthetic

REPO = Path(__file__).resolve().parents[2]
# configs/highres.yaml at the scale of a test: 64 px working size, tiles of 32 (its bank_size stays)
SMALL = ["--data.image_size", "[64,64]", "--model.tile_size", "32", "--model.tile_overlap", "16"]
SMALL += ["--model.pixel_eval_size", "32", "--model.pretrained", "false"]


@pytest.fixture(scope="module")
def ad2_root(tmp_path_factory):
    """MVTec AD 2 layout with frames of 80 x 112 px: the working size is not the images' own."""
    return write_synthetic(tmp_path_factory.mktemp("ad2"), "MVTecAD2", ["can"], 10, 3, 6, (80, 112))


def common(root: Path, out: Path) -> list[str]:
    return [
        "--config", str(REPO / "configs" / "highres.yaml"), *SMALL, "--data", "MVTecAD2", "--data.root", str(root),
        "--data.category", "can", "--data.num_workers", "0", "--trainer.accelerator", "cpu",
        "--trainer.default_root_dir", str(out),
    ]  # fmt: skip


def test_the_highres_config_runs_fit_test_as_written(ad2_root, tmp_path, capsys):
    args = [*common(ad2_root, tmp_path)[:-2], "--run.output_dir", str(tmp_path / "run")]
    assert main(["fit+test", *args]) == 0
    report = json.loads(capsys.readouterr().out)
    category = report["per_category"]["can"]
    assert category["status"] == "ok" and category["metrics"]["image_auroc"] is not None
    assert report["config"]["model"]["init_args"]["bank_size"] == 4096  # the config's own choice survives


def test_predict_maps_come_out_at_each_images_own_size_and_the_export_scores_alike(ad2_root, tmp_path, capsys):
    args = common(ad2_root, tmp_path)
    assert main(["fit", *args]) == 0
    checkpoint = next(tmp_path.rglob("detector.ckpt"))
    assert main(["predict", *args, "--ckpt_path", str(checkpoint), "--data.predict_split", "test_private"]) == 0
    out = tmp_path / "predictions"
    maps = sorted((out / "anomaly_images" / "can" / "test_private").iterdir())
    assert len(maps) == 3
    for path in maps:
        with Image.open(path) as anomaly_map:
            assert anomaly_map.mode == "F" and anomaly_map.size == (112, 80)  # the frame's, not the working size
    capsys.readouterr()
    bundle = tmp_path / "bundle"
    images = ad2_root / "can" / "test_public"
    export = ["export", "--ckpt_path", str(checkpoint), "--format", "onnx", "--output", str(bundle)]
    assert main([*export, "--check", str(images)]) == 0
    check = json.loads(capsys.readouterr().out)
    assert check["passed"] and check["decisions_differ"] == 0 and check["score"]["max_rel"] <= 1e-4
    metadata = json.loads((bundle / "metadata.json").read_text())
    assert metadata["detector"]["arguments"]["tile_size"] == 32
