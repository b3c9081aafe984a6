import os
import shutil
import struct
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lit_anomaly.data import BTAD, DatasetError, Folder, MVTecAD, MVTecAD2, MVTecLOCO, VisA, write_synthetic
from lit_anomaly.data.dataset import to_float_batch
from lit_anomaly.data.image_io import read_image, read_mask, to_rgb_array
from lit_anomaly.utils.process import LOADER_WORKER_NICENESS, keep_freed_memory

CLASSES = {
    "MVTecAD": MVTecAD,
    "MVTecAD2": MVTecAD2,
    "MVTecLOCO": MVTecLOCO,
    "BTAD": BTAD,
    "VisA": VisA,
    "Folder": Folder,
}
# family -> (category, train, calibration, test, defect types); no hold-out by default, so only the
# families with their own validation/good have a calibration split
EXPECTED = {
    "MVTecAD": ("bottle", 10, 0, 8, {"good", "scratch", "stain"}),
    "MVTecAD2": ("can", 10, 2, 8, {"good", "bad"}),
    "MVTecLOCO": ("juice_bottle", 10, 2, 8, {"good", "logical_anomalies", "structural_anomalies"}),
    "BTAD": ("01", 10, 0, 8, {"good", "ko"}),
    "VisA": ("candle", 10, 0, 8, {"good", "anomaly"}),
    "Folder": ("custom", 10, 0, 8, {"good", "scratch", "stain"}),
}


def make(family, root, category=None, **kwargs):
    kwargs.setdefault("num_workers", 0)
    kwargs.setdefault("image_size", 32)
    return CLASSES[family](root, category or EXPECTED[family][0], **kwargs)


def batches(dm, split):
    return [dm.on_after_batch_transfer(dm.on_before_batch_transfer(b, 0), 0) for b in dm.dataloader(split)]


def tree_state(root: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("family", list(EXPECTED))
def test_family_splits_and_batch_contract(family, family_roots):
    root = family_roots[family]
    before = tree_state(root)
    _category, n_train, n_calibration, n_test, defect_types = EXPECTED[family]
    dm = make(family, root, eval_batch_size=3)
    dm.setup()
    assert (len(dm.samples("train")), len(dm.samples("calibration")), len(dm.samples("test"))) == (
        n_train,
        n_calibration,
        n_test,
    )
    train_paths = {s.path for s in dm.samples("train")}
    assert train_paths.isdisjoint(s.path for s in dm.samples("calibration"))
    test = batches(dm, "test")
    images = torch.cat([b["image"] for b in test])
    masks = torch.cat([b["mask"] for b in test])
    labels = torch.cat([b["label"] for b in test])
    assert images.shape == (n_test, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert masks.shape == (n_test, 1, 32, 32) and set(masks.unique().tolist()) <= {0.0, 1.0}
    assert torch.cat([b["index"] for b in test]).tolist() == list(range(n_test))
    assert labels.tolist().count(0) == 4 and labels.tolist().count(1) == 4
    assert {t for b in test for t in b["defect_type"]} == defect_types
    has_mask = torch.cat([b["has_mask"] for b in test])
    assert has_mask.all()
    normal_masks, defect_masks = masks[labels == 0], masks[labels == 1]
    assert normal_masks.sum() == 0
    assert (defect_masks.flatten(1).sum(1) > 0).all()  # every defect image has a non-empty mask
    assert all(Path(p).is_file() for b in test for p in b["path"])
    assert tree_state(root) == before  # nothing written into the dataset


def test_categories(family_roots):
    assert MVTecAD.categories(family_roots["MVTecAD"]) == ["bottle", "carpet"]
    assert BTAD.categories(family_roots["BTAD"]) == ["01", "02"]
    assert BTAD.categories(family_roots["BTAD"] / "BTech_Dataset_transformed") == ["01", "02"]
    assert VisA.categories(family_roots["VisA"]) == ["candle", "pcb1"]
    assert MVTecAD2.categories(family_roots["MVTecAD2"]) == ["can"]
    assert MVTecLOCO.categories(family_roots["MVTecLOCO"]) == ["juice_bottle"]
    assert Folder.categories(family_roots["Folder"]) == ["custom"]


def test_btad_both_root_levels_and_extensions(family_roots):
    nested = family_roots["BTAD"] / "BTech_Dataset_transformed"
    for root in (family_roots["BTAD"], nested):
        dm = make("BTAD", root, "01")
        dm.setup()
        assert {s.path.suffix for s in dm.samples("test")} == {".bmp"}
    dm = make("BTAD", nested, "02")
    dm.setup()
    assert {s.path.suffix for s in dm.samples("train")} == {".png"}


def test_visa_raw_masks_are_binarised(family_roots):
    dm = make("VisA", family_roots["VisA"])
    raw = np.asarray(Image.open(dm.samples("test")[-1].masks[0]))
    assert 0 < raw.max() < 255  # small positive values in the raw tree
    masks = torch.cat([b["mask"] for b in batches(dm, "test")])
    assert set(masks.unique().tolist()) == {0.0, 1.0}


def test_visa_converted_layout(tmp_path, family_roots):
    source = family_roots["MVTecAD"] / "bottle"
    target = tmp_path / "visa" / "candle"
    shutil.copytree(source / "train", target / "train")
    (target / "test" / "good").mkdir(parents=True)
    for p in (source / "test" / "good").iterdir():
        shutil.copy(p, target / "test" / "good" / p.name)
    (target / "test" / "bad").mkdir()
    (target / "ground_truth" / "bad").mkdir(parents=True)
    for p in (source / "test" / "scratch").iterdir():
        shutil.copy(p, target / "test" / "bad" / p.name)
        shutil.copy(
            source / "ground_truth" / "scratch" / f"{p.stem}_mask.png", target / "ground_truth" / "bad" / p.name
        )
    assert VisA.categories(tmp_path / "visa") == ["candle"]
    dm = make("VisA", tmp_path / "visa")
    dm.setup()
    assert [s.label for s in dm.samples("test")] == [0] * 4 + [1] * 2
    assert all(s.masks for s in dm.samples("test") if s.label == 1)


def test_loco_masks_are_ored(family_roots):
    dm = make("MVTecLOCO", family_roots["MVTecLOCO"], image_size=48)
    sample = next(s for s in dm.samples("test") if s.label == 1)
    assert len(sample.masks) == 2
    separate = [np.asarray(Image.open(p)) > 0 for p in sample.masks]
    batch = batches(dm, "test")[0]
    position = [Path(p) for p in batch["path"]].index(sample.path)
    assert torch.equal(batch["mask"][position, 0].bool(), torch.from_numpy(separate[0] | separate[1]))


def test_loco_spro_masks_are_built_without_a_warning(family_roots):
    dm = make("MVTecLOCO", family_roots["MVTecLOCO"], image_size=48)
    torch.set_warn_always(True)  # torch's "array is not writable" warning otherwise shows once a process
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            defects = dm.spro_defects((48, 48))
    finally:
        torch.set_warn_always(False)
    assert defects and all(mask.shape == (48, 48) for found in defects.values() for mask, _ in found)


def test_mvtec_ad2_private_splits_are_unlabelled(family_roots):
    dm = make("MVTecAD2", family_roots["MVTecAD2"], predict_split="test_private")
    predict = batches(dm, "predict")
    labels = torch.cat([b["label"] for b in predict])
    assert labels.tolist() == [-1, -1, -1]
    assert not torch.cat([b["has_mask"] for b in predict]).any()
    with pytest.raises(DatasetError, match="predict_split"):
        make("MVTecAD2", family_roots["MVTecAD2"], predict_split="validation")


def test_calibration_hold_out_is_seeded(family_roots):
    root = family_roots["MVTecAD"]

    def split(seed):
        return [s.path.name for s in make("MVTecAD", root, seed=seed, calibration_fraction=0.3).samples("calibration")]

    assert split(0) == split(0)
    assert len(split(0)) == 3
    assert any(split(0) != split(s) for s in range(1, 5))
    held_out = make("MVTecAD", root, calibration_fraction=0.3)
    assert held_out.calibration_source == "hold-out" and make("MVTecAD", root).calibration_source is None
    assert make("MVTecLOCO", family_roots["MVTecLOCO"]).calibration_source == "validation"


def test_limits_are_deterministic_and_keep_both_labels(family_roots):
    root = family_roots["MVTecAD"]
    first = make("MVTecAD", root, limit_train=4, limit_test=3)
    second = make("MVTecAD", root, limit_train=4, limit_test=3)
    assert [s.path for s in first.samples("train")] == [s.path for s in second.samples("train")]
    assert len(first.samples("train")) == 4
    test = first.samples("test")
    assert len(test) == 3 and {s.label for s in test} == {0, 1}
    assert [s.path for s in test] == [s.path for s in second.samples("test")]
    assert len(make("MVTecAD", root, limit_test=2).samples("test")) == 2


def test_missing_root_shows_expected_tree(tmp_path):
    with pytest.raises(DatasetError, match="does not exist") as error:
        make("MVTecAD", tmp_path / "nowhere").setup()
    assert str(tmp_path / "nowhere") in str(error.value) and "ground_truth/<defect>/000_mask.png" in str(error.value)
    with pytest.raises(DatasetError, match="no MVTecAD category found"):
        MVTecAD.categories(tmp_path)  # wrong level: exists but holds no category


def test_unknown_category_lists_valid(family_roots):
    with pytest.raises(DatasetError, match="valid: bottle, carpet"):
        make("MVTecAD", family_roots["MVTecAD"], "bottel").setup()


def test_empty_train_split_names_folder(tmp_path, family_roots):
    root = tmp_path / "mvtec"
    shutil.copytree(family_roots["MVTecAD"] / "bottle", root / "bottle")
    for p in (root / "bottle" / "train" / "good").iterdir():
        p.unlink()
    with pytest.raises(DatasetError, match=r"empty train split.*train/good"):
        make("MVTecAD", root).setup()


def test_corrupt_image_is_named_in_main_process(tmp_path, family_roots):
    root = tmp_path / "mvtec"
    shutil.copytree(family_roots["MVTecAD"] / "bottle", root / "bottle")
    broken = root / "bottle" / "test" / "good" / "001.png"
    broken.write_bytes(broken.read_bytes()[:60])  # truncated PNG
    dm = make("MVTecAD", root, num_workers=2)
    with pytest.raises(DatasetError, match=f"cannot read image {broken}") as error:
        batches(dm, "test")
    assert "Traceback" not in str(error.value)


def test_anomalous_image_without_mask(tmp_path, family_roots):
    root = tmp_path / "mvtec"
    shutil.copytree(family_roots["MVTecAD"] / "bottle", root / "bottle")
    (root / "bottle" / "ground_truth" / "stain" / "000_mask.png").unlink()
    batch = batches(make("MVTecAD", root, eval_batch_size=8), "test")[0]
    missing = [i for i, p in enumerate(batch["path"]) if p.endswith("stain/000.png")]
    assert batch["label"][missing].tolist() == [1]
    assert not batch["has_mask"][missing].any() and batch["has_mask"].sum() == 7


def test_odd_image_modes_and_mask_sizes(tmp_path):
    root = tmp_path / "odd"
    rng = np.random.default_rng(0)
    modes = {
        "gray.png": Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)),
        "deep.png": Image.fromarray(rng.integers(0, 65535, (40, 40), dtype=np.uint16)),
        "palette.png": Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).convert("P"),
        "alpha.png": Image.fromarray(rng.integers(0, 255, (40, 40, 4), dtype=np.uint8), "RGBA"),
        "upper.JPG": Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)),
        "scan.TIFF": Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)),
    }
    for folder in ("train/OK", "test/Normal", "test/dent"):
        (root / folder).mkdir(parents=True)
        for name, image in modes.items():
            image.save(root / folder / name)
    (root / "ground_truth" / "dent").mkdir(parents=True)
    small = np.zeros((10, 10), dtype=np.uint8)
    small[:5] = 255  # top half, at a quarter of the image size
    Image.fromarray(small).save(root / "ground_truth" / "dent" / "gray_mask.png")
    dm = Folder(root, image_size=20, num_workers=0, calibration_fraction=0, eval_batch_size=20)
    assert len(dm.samples("train")) == 6
    batch = batches(dm, "test")[0]
    assert batch["image"].shape == (12, 3, 20, 20)
    assert batch["label"].tolist() == [0] * 6 + [1] * 6
    gray = batch["path"].index(str(root / "test" / "dent" / "gray.png"))
    assert batch["mask"][gray, 0, :10].min() == 1 and batch["mask"][gray, 0, 10:].max() == 0
    deep = batch["path"].index(str(root / "test" / "Normal" / "deep.png"))
    assert 0.35 < batch["image"][deep].mean() < 0.65  # 16-bit range scaled to 8 bits, not clipped to white
    assert batch["has_mask"].tolist() == [True] * 6 + [i == gray for i in range(6, 12)]


def test_hidden_files_and_folders_are_not_data(tmp_path, family_roots):
    """A Mac's AppleDouble `._NAME.png` beside each image (not a PNG) failed the category; Jupyter's
    `.ipynb_checkpoints/` under test/ became a defect type."""
    root = tmp_path / "mine"
    shutil.copytree(family_roots["MVTecAD"] / "bottle", root)
    for folder in (root / "train" / "good", root / "test" / "good", root / "test" / "scratch"):
        for image in list(folder.iterdir()):
            (folder / f"._{image.name}").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
        (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    shutil.copytree(root / "test" / "good", root / "test" / ".ipynb_checkpoints")
    shutil.copytree(root / "test", root / ".ipynb_checkpoints" / "incoming")
    dm = Folder(root, image_size=32, num_workers=0, calibration_fraction=0, eval_batch_size=16)
    dm.setup()
    assert len(dm.samples("train")) == 10
    assert {s.defect_type for s in dm.samples("test")} == {"good", "scratch", "stain"}
    assert len(torch.cat([b["label"] for b in batches(dm, "test")])) == 8  # every file decodes
    dm = Folder(root, image_size=32, num_workers=0, predict_dir=root)
    dm.setup("predict")
    assert not any(part.startswith(".") for s in dm.samples("predict") for part in s.path.relative_to(root).parts)


def test_folder_rejects_all(family_roots):
    with pytest.raises(DatasetError, match="not supported by Folder"):
        Folder(family_roots["Folder"], "all", num_workers=0).setup()


def test_bad_arguments(family_roots):
    with pytest.raises(DatasetError, match="calibration_fraction"):
        make("MVTecAD", family_roots["MVTecAD"], calibration_fraction=1.5)
    with pytest.raises(DatasetError, match="leaving none to fit on"):  # 0.99 of 10 images holds out all 10
        make("MVTecAD", family_roots["MVTecAD"], calibration_fraction=0.99).setup()
    with pytest.raises(DatasetError, match="limit_test"):
        make("MVTecAD", family_roots["MVTecAD"], limit_test=0)


def test_float_batch_conversion():
    batch = {
        "image": torch.full((1, 3, 2, 2), 255, dtype=torch.uint8),
        "mask": torch.ones(1, 1, 2, 2, dtype=torch.uint8),
    }
    out = to_float_batch(batch)
    assert out["image"].dtype == torch.float32 and out["image"].max() == 1.0 and out["mask"].dtype == torch.float32


def test_predict_dir_needs_no_dataset_tree(tmp_path, family_roots):
    incoming = family_roots["MVTecAD"] / "bottle" / "test"  # nested folders of images
    dm = Folder(tmp_path / "not-here", predict_dir=incoming, num_workers=0, image_size=32)
    dm.setup("predict")
    labels = torch.cat([b["label"] for b in batches(dm, "predict")])
    assert labels.tolist() == [-1] * 8
    with pytest.raises(DatasetError, match="predict_dir"):
        Folder(tmp_path, predict_dir=tmp_path / "none", num_workers=0).setup("predict")


def test_decode_cache_serves_a_second_run_and_misses_changed_files(family_roots, tmp_path, monkeypatch):
    import lit_anomaly.data.dataset as base

    root = family_roots["MVTecAD"]
    first = batches(make("MVTecAD", root, cache_dir=tmp_path / "cache"), "test")

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(base, "read_image", no_decoding)
    second = batches(make("MVTecAD", root, cache_dir=tmp_path / "cache"), "test")
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    with pytest.raises(DatasetError, match="decoded although cached"):  # another image_size is another entry
        batches(make("MVTecAD", root, cache_dir=tmp_path / "cache", image_size=24), "test")


def test_a_cache_folder_that_cannot_be_made_is_refused_and_a_full_one_costs_nothing(
    family_roots, tmp_path, monkeypatch
):
    root = family_roots["MVTecAD"]
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with pytest.raises(DatasetError, match=f"--data.cache_dir {not_a_folder}: cannot create the folder"):
        make("MVTecAD", root, cache_dir=not_a_folder)
    import lit_anomaly.data.cache as cache

    def disk_full(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache, "write_atomic", disk_full)
    uncached = batches(make("MVTecAD", root), "test")
    for a, b in zip(uncached, batches(make("MVTecAD", root, cache_dir=tmp_path / "cache"), "test"), strict=True):
        assert torch.equal(a["image"], b["image"])


ADAM7 = ((0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2), (1, 0, 2, 1))


def write_png(path, array, interlaced=False):
    """An RGB PNG of uint8 or uint16 `array`, Adam7-interlaced if asked (Pillow writes neither 16-bit RGB nor
    interlaced PNGs)."""
    height, width, _ = array.shape

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    passes = [array[y::dy, x::dx] for y, x, dy, dx in ADAM7] if interlaced else [array]
    raw = b"".join(b"\x00" + row.astype(array.dtype.newbyteorder(">")).tobytes() for p in passes for row in p)
    depth = array.dtype.itemsize * 8
    header = struct.pack(">IIBBBBB", width, height, depth, 2, 0, 0, int(interlaced))
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def test_png_fast_path_decodes_the_pixels_pillow_decodes(tmp_path):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray((rng.random((37, 53, 3)) * 255).astype(np.uint8))
    variants = {
        "rgb": (rgb, {}), "rgba": (rgb.convert("RGBA"), {}), "la": (rgb.convert("LA"), {}),
        "grey": (rgb.convert("L"), {}), "grey_trns": (rgb.convert("L"), {"transparency": 3}),
        "bilevel": (rgb.convert("1"), {}), "palette": (rgb.convert("P"), {}),
        "palette_trns": (rgb.convert("P"), {"transparency": 3}), "palette_4bit": (rgb.convert("P"), {"bits": 4}),
        "grey16": (Image.fromarray((rng.random((37, 53)) * 65535).astype(np.uint16)), {}),
    }  # fmt: skip
    paths = []
    for name, (image, options) in variants.items():
        image.save(path := tmp_path / f"{name}.png", **options)
        paths.append(path)
    write_png(deep := tmp_path / "rgb16.png", (rng.random((20, 30, 3)) * 65535).astype(np.uint16))
    write_png(interlaced := tmp_path / "interlaced.png", np.asarray(rgb), interlaced=True)
    for path in [*paths, deep, interlaced]:
        with Image.open(path) as image:
            expected, values = to_rgb_array(image), np.asarray(image)
        assert np.array_equal(read_image(path, expected.shape[:2]), expected), path.name
        defect = (values.max(axis=2) if values.ndim == 3 else values) > 0
        assert np.array_equal(read_mask([path], defect.shape), defect), path.name


def test_resizing_matches_pillow_full_resampling(tmp_path):
    rng = np.random.default_rng(1)
    pixels = (rng.random((90, 120, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path := tmp_path / "image.png")
    Image.fromarray(pixels[..., 0] > 128).save(mask_path := tmp_path / "mask.png")
    Image.fromarray(pixels[..., 1]).save(grey_path := tmp_path / "grey.png")
    Image.fromarray(pixels[..., 1]).convert("RGB").save(grey_rgb_path := tmp_path / "grey_rgb.png")
    for size in [(23, 31), (90, 200), (256, 256)]:
        expected = np.asarray(Image.fromarray(pixels).resize(size[::-1], Image.BILINEAR), dtype=np.int16)
        assert np.abs(read_image(path, size).astype(np.int16) - expected).max() <= 1, size
        nearest = np.asarray(Image.fromarray(pixels[..., 0] > 128).resize(size[::-1], Image.NEAREST))
        assert np.array_equal(read_mask([mask_path], size), nearest), size
        grey_as_rgb = read_image(grey_path, size), read_image(grey_rgb_path, size)  # one plane resized, or three
        assert np.array_equal(*grey_as_rgb), size


_BUFFER_BYTES = 40 << 20
_HUGE_PAGE_BYTES = 2 << 20


class _FreshBuffers(torch.utils.data.Dataset):
    """Each item fills two fresh 40 MB buffers, as decoding a 13-Mpx PNG does (inflated rows, then pixels), and
    returns the page faults it took. Above 32 MB, glibc's own threshold never keeps such blocks, whatever the
    forked parent allocated before."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, index: int) -> int:
        import resource

        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        rows = np.ones(_BUFFER_BYTES, dtype=np.uint8)
        pixels = rows + 1
        del rows, pixels
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


class _Niceness(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> int:
        return os.nice(0)


@pytest.mark.skipif(not hasattr(os, "nice"), reason="POSIX niceness")
def test_loader_workers_decode_at_lower_priority_than_the_model(family_roots):
    worker_init = make("MVTecAD", family_roots["MVTecAD"], num_workers=1).dataloader("train").worker_init_fn
    loader = torch.utils.data.DataLoader(_Niceness(), batch_size=None, num_workers=1, worker_init_fn=worker_init)
    assert list(loader) == [min(19, os.nice(0) + LOADER_WORKER_NICENESS)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc thresholds")
def test_loader_workers_reuse_freed_image_buffers():
    def faults(init) -> int:
        loader = torch.utils.data.DataLoader(_FreshBuffers(), batch_size=None, num_workers=1, worker_init_fn=init)
        return sum(list(loader)[2:])  # after the first items: glibc's own threshold adapts to them

    untuned, tuned = faults(None), faults(keep_freed_memory)
    # Fresh memory costs at least one fault per 2 MB touched, fewer than per 4 KB page where the kernel or numpy's
    # madvise gives transparent huge pages (a CI machine did: 169 faults where this one takes 2200).
    fewest_fresh = 4 * 2 * _BUFFER_BYTES // _HUGE_PAGE_BYTES
    assert untuned >= fewest_fresh and tuned < untuned / 10, (untuned, tuned)


@pytest.mark.parametrize("family", ["MVTecAD2", "MVTecLOCO", "VisA"])
def test_synthetic_files_do_not_depend_on_the_number_of_writer_threads(family, tmp_path, monkeypatch):
    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    categories = {"MVTecAD2": ["can", "rice"], "MVTecLOCO": ["pushpins"], "VisA": ["candle", "cashew"]}[family]
    trees = {}
    for threads in (1, 4):
        monkeypatch.setattr(os, "cpu_count", lambda threads=threads: threads)
        trees[threads] = files(write_synthetic(tmp_path / str(threads), family, categories, 4, 2, 5, (24, 32)))
    assert len(trees[1]) > 20 and trees[1] == trees[4]


@pytest.mark.parametrize("family", ["MVTecAD", "MVTecLOCO"])
def test_synthetic_grey_images_are_the_colour_ones_converted(family, tmp_path):
    """mode "L" writes what a monochrome camera delivers: each image is its colour twin as Pillow converts it,
    defects included, with the same masks."""
    colour = write_synthetic(tmp_path / "rgb", family, ["tile"], 3, 2, 4, 48)
    grey = write_synthetic(tmp_path / "grey", family, ["tile"], 3, 2, 4, 48, mode="L")
    files = sorted(p.relative_to(grey) for p in grey.rglob("*.png"))
    assert files == sorted(p.relative_to(colour) for p in colour.rglob("*.png"))
    images = [f for f in files if "ground_truth" not in str(f)]
    assert len(images) > 8
    for file in files:
        with Image.open(colour / file) as c, Image.open(grey / file) as g:
            if file in images:
                assert g.mode == "L" and c.mode == "RGB", file
                difference = np.abs(np.asarray(c.convert("L"), np.int16) - np.asarray(g, np.int16))
                assert difference.max() <= 1, file  # stains blend in grey, then round
            else:
                assert np.array_equal(np.asarray(c), np.asarray(g)), file
