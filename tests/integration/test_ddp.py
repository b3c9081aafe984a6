"""DDP on CPU (gloo) gives the same answer as one device: threshold, metrics, per-image scores."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lit_anomaly.data import write_synthetic

# Intra-op thread count changes oneDNN's summation order; every process gets one thread, as
# Lightning gives each of two DDP processes on this 2-core machine.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def ddp_root(tmp_path_factory):
    # 13 train images: odd shard sizes, so DistributedSampler pads with repeats that must be dropped
    return write_synthetic(tmp_path_factory.mktemp("ddp"), "MVTecAD", ["carpet", "tile"], 15, 5, 4, 64)


def fit_test_args(root, model, out, *extra):
    return [
        "fit+test", "--model", model, "--model.backbone", "efficientnet_lite0", "--data", "MVTecAD",
        "--data.root", str(root), "--data.image_size", "[64,64]", "--data.num_workers", "0",
        "--data.train_batch_size", "4", "--data.eval_batch_size", "4", "--trainer.accelerator", "cpu",
        "--run.output_dir", str(out), *extra,
    ]  # fmt: skip


def run(command, timeout=300):
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)  # stdout is exactly one JSON document


def records(out, category):
    lines = (out / "categories" / category / "per_image.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def assert_same(single, distributed, single_dir, distributed_dir):
    assert single["categories"] == distributed["categories"]
    for category in single["categories"]:
        a, b = single["per_category"][category], distributed["per_category"][category]
        assert a["status"] == b["status"] == "ok"
        assert a["threshold"] == pytest.approx(b["threshold"], rel=1e-12)
        assert a["threshold_provenance"] == b["threshold_provenance"]
        for key, value in a["metrics"].items():
            assert value == pytest.approx(b["metrics"][key], abs=1e-6), key
        first, second = records(single_dir, category), records(distributed_dir, category)
        assert len(second) == a["counts"]["test"] == len({r["index"] for r in second})  # one record per image
        for x, y in zip(first, second, strict=True):
            assert x["index"] == y["index"] and x["path"] == y["path"]
            assert x["score"] == pytest.approx(y["score"], rel=1e-9)


# the high-resolution mode's flags at this scale: tiles, a bounded bank, a top-k image score
HIGH_RESOLUTION = ["--model.tile_size", "32", "--model.tile_overlap", "16", "--model.bank_size", "60"]
HIGH_RESOLUTION += ["--model.score_top_k", "3", "--model.pixel_eval_size", "32"]


@pytest.mark.parametrize(
    ("model", "category", "flags"),
    [
        ("PatchCore", "all", []),
        ("PaDiM", "carpet", []),
        ("PatchCore", "carpet", HIGH_RESOLUTION),
        ("PatchCore", "all", ["--run.unified", "true"]),
    ],
    ids=["PatchCore", "PaDiM", "PatchCore-high-resolution", "PatchCore-unified"],
)
def test_two_process_ddp_matches_one_device(ddp_root, tmp_path, model, category, flags):
    cli = [sys.executable, "-m", "lit_anomaly"]
    args = ["--data.category", category, *flags]
    single = run([*cli, *fit_test_args(ddp_root, model, tmp_path / "one", *args)])
    ddp = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
    distributed = run([*cli, *fit_test_args(ddp_root, model, tmp_path / "ddp", *args, *ddp)])
    assert_same(single, distributed, tmp_path / "one", tmp_path / "ddp")
    assert {r["hardware"]["world_size"] for r in distributed["per_category"].values()} == {2}
    if "unified" in single:  # the class-agnostic threshold too
        assert single["unified"]["threshold_provenance"] == distributed["unified"]["threshold_provenance"]


@pytest.mark.parametrize(
    ("devices", "several"),
    [
        (1, False),
        ("1", False),
        ([3], False),
        ("0,", False),
        (2, True),
        ("2", True),
        ("0,1", True),
        ("auto", True),
        (-1, True),
    ],
)
def test_a_frozen_detector_on_several_devices_gets_ddp_without_gradients(devices, several):
    """`--trainer.devices 2` arrives as the string "2": it was taken for one device, so Lightning chose its
    DDP, which refuses a module without trainable parameters (every category failed)."""
    from lit_anomaly.utils.distributed import FrozenDDPStrategy, frozen_ddp

    assert isinstance(frozen_ddp("auto", devices), FrozenDDPStrategy) == several


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_over_loopback_match_one_device(ddp_root, tmp_path):
    args = fit_test_args(ddp_root, "PatchCore", tmp_path / "nodes", "--data.category", "tile")
    args += ["--trainer.num_nodes", "2", "--trainer.strategy", "ddp"]
    single = run(
        [
            sys.executable,
            "-m",
            "lit_anomaly",
            *fit_test_args(ddp_root, "PatchCore", tmp_path / "one", "--data.category", "tile"),
        ]
    )
    port = str(free_port())
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1"]
    launcher += ["--master_addr", "127.0.0.1", "--master_port", port]
    nodes = [
        subprocess.Popen(
            [*launcher, "--node_rank", str(rank), "-m", "lit_anomaly", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    assert outputs[1][0].strip() == ""  # only global rank 0 prints the summary
    assert_same(single, json.loads(outputs[0][0]), tmp_path / "one", tmp_path / "nodes")


def test_two_process_predict_counts_every_ranks_unreadable_files(ddp_root, tmp_path):
    """An unreadable file in rank 1's share made rank 1 fail, while the command (rank 0) exited 0."""
    from lit_anomaly.pipelines import run_benchmark

    data = {"class_path": "MVTecAD", "init_args": {"root": str(ddp_root), "image_size": 64, "num_workers": 0}}
    model = {"class_path": "PatchCore", "init_args": {"backbone": "efficientnet_lite0"}}
    run = {"output_dir": str(tmp_path / "fit"), "checkpoints": True}
    run_benchmark(model=model, data=data, category="tile", trainer={"accelerator": "cpu"}, run=run)
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    for i, image in enumerate(sorted((ddp_root / "tile" / "test" / "good").iterdir())[:3]):
        (incoming / f"{2 * i:03d}.png").write_bytes(image.read_bytes())
    (incoming / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # index 1: rank 1's share
    command = [
        sys.executable,
        "-m",
        "lit_anomaly",
        "predict",
        "--ckpt_path",
        str(tmp_path / "fit" / "categories" / "tile" / "detector.ckpt"),
    ]
    command += ["--data.predict_dir", str(incoming), "--data.num_workers", "0", "--trainer.accelerator", "cpu"]
    command += ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.default_root_dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.count("lit-anomaly: error: 1 of 4 images could not be read") == 1  # rank 0 says it, once
    # one file in input order, as one process writes it; the ranks' own files are merged into it and gone
    lines = [json.loads(line) for line in (tmp_path / "predictions" / "predictions.jsonl").read_text().splitlines()]
    assert [line["index"] for line in lines] == [0, 1, 2, 3] and [
        line["index"] for line in lines if "error" in line
    ] == [1]
    assert [Path(line["path"]).name for line in lines] == ["000.png", "001.png", "002.png", "004.png"]
    assert not list((tmp_path / "predictions").glob("predictions.rank*.jsonl"))
