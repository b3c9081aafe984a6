"""Small, realistic synthetic datasets written in each family's exact on-disk layout.

Normals are seeded procedural textures (woven stripes, low-frequency shading, sensor noise) that
vary in phase and illumination from image to image; anomalies add a visible defect (scratch,
stain, hole, crack) of random shape whose mask is drawn with the same strokes. Tests and the
offline demo use them; nothing here is a stand-in for real results.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .mvtec import MVTecAD
from .samples import DatasetError

DEFECTS = ("scratch", "stain", "hole", "crack")
# Defects of tens of pixels in multi-megapixel frames (write_synthetic's defects="small"): a thin thread, a faint
# fleck, and a knot where the weave turns without changing the mean grey. Resizing a frame to 256 px blurs the
# first two into the texture and erases the third.
SMALL_DEFECTS = ("thread", "fleck", "knot")
FAMILIES = ("MVTecAD", "MVTecAD2", "MVTecLOCO", "BTAD", "VisA", "Folder")


def _rng(*keys: object) -> np.random.Generator:
    digest = hashlib.sha256("/".join(map(str, keys)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def normal_image(style: str, index: int, size: int | tuple[int, int]) -> Image.Image:
    """One defect-free texture of `style`, `size` px square or (H, W); images of a style share structure, not pixels."""
    height, width = (size, size) if isinstance(size, int) else size
    style_rng, rng = _rng("style", style), _rng("image", style, index)
    base = style_rng.uniform(60, 200, size=3)
    tint = style_rng.uniform(20, 50, size=3)
    period = style_rng.uniform(6, 14)
    angle = style_rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=2)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    weave = np.sin(2 * np.pi * u / period + phase[0]) * np.sin(2 * np.pi * v / (period * 1.7) + phase[1])
    shading = 1.0 + rng.uniform(-0.08, 0.08) + 0.05 * np.sin(xx / width * np.pi + rng.uniform(0, np.pi))
    pixels = (base + tint * weave[..., None]) * shading[..., None]
    pixels += rng.normal(0, 4.0, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def add_defect(image: Image.Image, kind: str, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """Draw one defect of `kind` onto a copy of `image`; returns (image, 0/255 mask)."""
    extent = np.array(image.size, dtype=np.float64)  # (W, H)
    size = float(extent.min())
    image = image.copy()
    mask = Image.new("L", image.size, 0)
    draw, mask_draw = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    centre = rng.uniform(0.25, 0.75, size=2) * extent
    rgb = tuple(int(c) for c in rng.choice([rng.integers(0, 50, 3), rng.integers(205, 256, 3)]))
    colour = Image.new("RGB", (1, 1), rgb).convert(image.mode).getpixel((0, 0))  # as `convert` maps the texture
    if kind in ("scratch", "crack"):
        points = [tuple(centre)]
        steps = 2 if kind == "scratch" else 5
        for _ in range(steps):
            step = rng.uniform(-0.22, 0.22, size=2) * size
            points.append(tuple(np.clip(np.array(points[-1]) + step, 2, extent - 3)))
        width = max(2, int(size * (0.025 if kind == "scratch" else 0.018)))
        draw.line(points, fill=colour, width=width, joint="curve")
        mask_draw.line(points, fill=255, width=width, joint="curve")
    else:
        radius = rng.uniform(0.06, 0.13, size=2) * size
        box = [tuple(centre - radius), tuple(centre + radius)]
        if kind == "hole":
            n = int(rng.integers(5, 9))
            angles = np.sort(rng.uniform(0, 2 * np.pi, n))
            radii = rng.uniform(0.6, 1.0, n)[:, None] * radius
            polygon = [
                tuple(centre + r * np.array([np.cos(a), np.sin(a)])) for a, r in zip(angles, radii, strict=False)
            ]
            draw.polygon(polygon, fill=colour)
            mask_draw.polygon(polygon, fill=255)
        else:
            stain = Image.new("L", image.size, 0)
            ImageDraw.Draw(stain).ellipse(box, fill=255)
            stain = stain.filter(ImageFilter.GaussianBlur(radius=size * 0.01))
            alpha = np.asarray(stain, dtype=np.float32)[..., None] / 255.0 * 0.85
            blended = np.atleast_3d(np.asarray(image, dtype=np.float32)) * (1 - alpha) + np.array(colour) * alpha
            pixels = blended.astype(np.uint8)
            image = Image.fromarray(pixels[..., 0] if image.mode == "L" else pixels)
            mask = Image.fromarray(((alpha[..., 0] > 0.3) * 255).astype(np.uint8))
    return image, mask


def add_small_defect(
    image: Image.Image, kind: str, rng: np.random.Generator, scale: float = 1.0
) -> tuple[Image.Image, Image.Image]:
    """Draw one small defect of `kind` (SMALL_DEFECTS) onto a copy of `image`, sized for 2-5 Mpx frames (about
    10-90 px at 2048 px, times `scale`); returns (image, 0/255 mask)."""
    extent = np.array(image.size, dtype=np.float64)  # (W, H)
    unit = scale * float(extent.min()) / 2048  # the sizes below are px of a 2048 px frame
    image = image.copy()
    mask = Image.new("L", image.size, 0)
    centre = rng.uniform(0.15, 0.85, size=2) * extent
    pixels = np.atleast_3d(np.asarray(image, dtype=np.float32))
    local = pixels.reshape(-1, pixels.shape[-1]).mean(0)
    shift = rng.choice([-1.0, 1.0]) * rng.uniform(20, 40)
    colour = tuple(int(np.clip(c + shift, 0, 255)) for c in local)
    colour = colour[0] if image.mode == "L" else colour
    if kind == "thread":
        angle, length = rng.uniform(0, np.pi), rng.uniform(30, 90) * unit
        step = np.array([np.cos(angle), np.sin(angle)]) * length / 2
        points = [tuple(centre - step), tuple(centre + step)]
        width = max(1, round(rng.uniform(2, 4) * unit))
        ImageDraw.Draw(image).line(points, fill=colour, width=width)
        ImageDraw.Draw(mask).line(points, fill=255, width=width)
    elif kind == "fleck":
        radius = rng.uniform(5, 12) * unit
        box = [tuple(centre - radius), tuple(centre + radius)]
        ImageDraw.Draw(mask).ellipse(box, fill=255)
        alpha = np.asarray(mask.filter(ImageFilter.GaussianBlur(radius=radius / 4)), dtype=np.float32)[..., None] / 255
        blended = pixels * (1 - alpha * 0.8) + np.array(colour, dtype=np.float32) * alpha * 0.8
        blended = np.clip(blended, 0, 255).astype(np.uint8)
        image = Image.fromarray(blended[..., 0] if image.mode == "L" else blended)
    elif kind == "knot":  # the weave inside a disc, turned a quarter: same grey, another texture
        radius = max(2, round(rng.uniform(12, 24) * unit))
        x, y = (int(c) for c in np.clip(centre, radius, extent - radius - 1))
        box = (x - radius, y - radius, x + radius, y + radius)
        ImageDraw.Draw(mask).ellipse(box, fill=255)
        image.paste(image.crop(box).transpose(Image.Transpose.ROTATE_90), box, mask.crop(box))
    else:
        raise ValueError(f"unknown small defect {kind!r}; valid: {', '.join(SMALL_DEFECTS)}")
    return image, mask


def _save(image: Image.Image, path: Path, **options: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)


def _saving(image_path: Path, mask_path: Path | None = None) -> Callable[[Image.Image, Image.Image], None]:
    """What `_Writer.anomalous` should do with an image and its mask: save them to these paths."""

    def save(image: Image.Image, mask: Image.Image) -> None:
        _save(image, image_path)
        if mask_path is not None:
            _save(mask, mask_path)

    return save


class _Writer:
    """Generates the images of one category on `pool`'s threads (NumPy and PNG encoding release the GIL); family
    functions decide where they go. Every image is seeded by its category and index: the files do not depend on
    the number of threads."""

    def __init__(
        self,
        category: str,
        size: int | tuple[int, int],
        mode: str,
        pool: ThreadPoolExecutor,
        defects: str = "regular",
        defect_scale: float = 1.0,
    ) -> None:
        self.category, self.size, self.mode, self.count, self.pool = category, size, mode, 0, pool
        small = partial(add_small_defect, scale=defect_scale)
        self.kinds, self.draw = (SMALL_DEFECTS, small) if defects == "small" else (DEFECTS, add_defect)
        self.pending: list[Future] = []

    def normal(self, path: Path, **options: Any) -> None:
        """Generate the next normal image and save it to `path` with PIL's save `options`."""
        self.count += 1
        self.pending.append(self.pool.submit(self._normal, self.count, path, options))

    def anomalous(self, finish: Callable[[Image.Image, Image.Image], None], kind: str | None = None) -> None:
        """Generate the next anomalous image with a defect of `kind` (random if None) and hand it and its mask to
        `finish`."""
        self.count += 1
        rng = _rng("defect", self.category, self.count)
        kind = kind or self.kinds[int(rng.integers(len(self.kinds)))]
        self.pending.append(self.pool.submit(self._anomalous, self.count, kind, rng, finish))

    def cycled_kind(self, i: int) -> str:
        """The defect of the i-th anomalous image where a layout names defect folders: the first two regular kinds
        alternate (scratch, stain), the small ones take turns."""
        return self.kinds[i % (2 if self.kinds is DEFECTS else len(self.kinds))]

    def wait(self) -> None:
        """Block until every image is written; re-raises the first error."""
        for future in self.pending:
            future.result()

    def _normal(self, index: int, path: Path, options: dict[str, Any]) -> None:
        _save(normal_image(self.category, index, self.size).convert(self.mode), path, **options)

    def _anomalous(self, index: int, kind: str, rng: np.random.Generator, finish: Callable) -> None:
        finish(*self.draw(normal_image(self.category, index, self.size).convert(self.mode), kind, rng))


def _mvtec(root: Path, w: _Writer, n_train: int, n_good: int, n_bad: int) -> None:
    cat = root / w.category
    for i in range(n_train):
        w.normal(cat / "train" / "good" / f"{i:03d}.png")
    for i in range(n_good):
        w.normal(cat / "test" / "good" / f"{i:03d}.png")
    counters: dict[str, int] = {}
    for i in range(n_bad):
        kind = w.cycled_kind(i)
        k = counters[kind] = counters.get(kind, -1) + 1
        w.anomalous(
            _saving(cat / "test" / kind / f"{k:03d}.png", cat / "ground_truth" / kind / f"{k:03d}_mask.png"), kind
        )


def _mvtec_ad2(root: Path, w: _Writer, n_train: int, n_good: int, n_bad: int) -> None:
    cat = root / w.category
    for i in range(n_train):
        w.normal(cat / "train" / "good" / f"{i:03d}_regular.png")
    for i in range(max(2, n_train // 5)):
        w.normal(cat / "validation" / "good" / f"{i:03d}_regular.png")
    for i in range(n_good):
        w.normal(cat / "test_public" / "good" / f"{i:03d}_regular.png")
    for i in range(n_bad):
        lighting = ("regular", "overexposed", "shift_1")[i % 3]
        stem = f"bad/{i:03d}_{lighting}"
        w.anomalous(
            _saving(cat / "test_public" / f"{stem}.png", cat / "test_public" / "ground_truth" / f"{stem}_mask.png")
        )
    for split in ("test_private", "test_private_mixed"):
        for i in range(3):
            path = cat / split / f"{i:03d}_regular.png"
            w.anomalous(_saving(path)) if i % 2 else w.normal(path)


LOCO_DEFECTS_CONFIG = [
    {"defect_name": "missing_part", "pixel_value": 255, "saturation_threshold": 1.0, "relative_saturation": True},
    {"defect_name": "extra_part", "pixel_value": 200, "saturation_threshold": 400, "relative_saturation": False},
]


def _loco_anomaly(
    category: str, index: int, image_path: Path, masks: Path, image: Image.Image, first: Image.Image
) -> None:
    """A second defect on top of the first; one mask per defect, valued as defects_config.json says."""
    image, second = add_defect(image, "stain", _rng("loco", category, index))
    _save(image, image_path)
    for j, (mask, entry) in enumerate(zip((first, second), LOCO_DEFECTS_CONFIG, strict=True)):
        values = (np.asarray(mask) > 0).astype(np.uint8) * entry["pixel_value"]
        _save(Image.fromarray(values), masks / f"{j:03d}.png")


def _mvtec_loco(root: Path, w: _Writer, n_train: int, n_good: int, n_bad: int) -> None:
    cat = root / w.category
    for i in range(n_train):
        w.normal(cat / "train" / "good" / f"{i:03d}.png")
    for i in range(max(2, n_train // 5)):
        w.normal(cat / "validation" / "good" / f"{i:03d}.png")
    for i in range(n_good):
        w.normal(cat / "test" / "good" / f"{i:03d}.png")
    for i in range(n_bad):
        defect_type = ("logical_anomalies", "structural_anomalies")[i % 2]
        stem = f"{i // 2:03d}"
        paths = (cat / "test" / defect_type / f"{stem}.png", cat / "ground_truth" / defect_type / stem)
        w.anomalous(partial(_loco_anomaly, w.category, i, *paths))
    cat.mkdir(parents=True, exist_ok=True)
    (cat / "defects_config.json").write_text(json.dumps(LOCO_DEFECTS_CONFIG, indent=2))


def _btad(root: Path, w: _Writer, n_train: int, n_good: int, n_bad: int) -> None:
    cat = root / "BTech_Dataset_transformed" / w.category
    ext = ".bmp" if w.category == "01" else ".png"
    for i in range(n_train):
        w.normal(cat / "train" / "ok" / f"{i:04d}{ext}")
    for i in range(n_good):
        w.normal(cat / "test" / "ok" / f"{i:04d}{ext}")
    for i in range(n_bad):
        w.anomalous(_saving(cat / "test" / "ko" / f"{i:04d}{ext}", cat / "ground_truth" / "ko" / f"{i:04d}.png"))


def _visa_anomaly(image_path: Path, mask_path: Path, mask_value: int, image: Image.Image, mask: Image.Image) -> None:
    """VisA's JPEG and its PNG mask valued `mask_value` (VisA numbers the defects of an image)."""
    _save(image, image_path, format="JPEG", quality=95)
    _save(Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * mask_value), mask_path)


def _visa(root: Path, w: _Writer, n_train: int, n_good: int, n_bad: int) -> None:
    rows = []
    for i in range(n_train + n_good):
        relative = f"{w.category}/Data/Images/Normal/{i:04d}.JPG"
        w.normal(root / relative, format="JPEG", quality=95)
        rows.append([w.category, "train" if i < n_train else "test", "normal", relative, ""])
    for i in range(n_bad):
        relative = f"{w.category}/Data/Images/Anomaly/{i:03d}.JPG"
        mask_relative = f"{w.category}/Data/Masks/Anomaly/{i:03d}.png"
        w.anomalous(partial(_visa_anomaly, root / relative, root / mask_relative, 1 + i % 3))
        rows.append([w.category, "test", "anomaly", relative, mask_relative])
    split_csv = root / "split_csv" / "1cls.csv"
    split_csv.parent.mkdir(parents=True, exist_ok=True)
    existing = split_csv.read_text().splitlines()[1:] if split_csv.exists() else []
    with split_csv.open("w", newline="") as handle:
        handle.write("object,split,label,image,mask\n" + "".join(line + "\n" for line in existing))
        csv.writer(handle, lineterminator="\n").writerows(rows)


def _folder(root: Path, w: _Writer, n_train: int, n_good: int, n_bad: int) -> None:
    for i in range(n_train):
        w.normal(root / "train" / "good" / f"{i:03d}.png")
    for i in range(n_good):
        w.normal(root / "test" / "good" / f"{i:03d}.png")
    for i in range(n_bad):
        kind = w.cycled_kind(i)
        w.anomalous(
            _saving(root / "test" / kind / f"{i:03d}.jpg", root / "ground_truth" / kind / f"{i:03d}_mask.png"), kind
        )


_WRITERS: dict[str, Callable[[Path, _Writer, int, int, int], None]] = {
    "MVTecAD": _mvtec, "MVTecAD2": _mvtec_ad2, "MVTecLOCO": _mvtec_loco,
    "BTAD": _btad, "VisA": _visa, "Folder": _folder,
}  # fmt: skip


def write_synthetic(
    root: str | Path,
    family: str = "MVTecAD",
    categories: Sequence[str] = ("bottle",),
    n_train: int = 20,
    n_test_good: int = 6,
    n_test_bad: int = 6,
    image_size: int | tuple[int, int] = 128,
    mode: str = "RGB",
    defects: str = "regular",
    defect_scale: float = 1.0,
) -> Path:
    """Write a synthetic dataset of `family` under `root` (Folder takes exactly one category) and return root.
    `mode` "L" writes the images as a monochrome camera would (8-bit grey), the same textures and defects.
    `defects` "small" draws SMALL_DEFECTS (tens of px in a 2048 px frame, times `defect_scale`) instead of
    DEFECTS."""
    if family not in _WRITERS:
        raise ValueError(f"unknown family {family!r}; valid: {', '.join(FAMILIES)}")
    if defects not in ("regular", "small"):
        raise ValueError(f"defects must be regular or small, got {defects!r}")
    root = Path(root)
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        writers = [_Writer(category, image_size, mode, pool, defects, defect_scale) for category in categories]
        for writer in writers:
            _WRITERS[family](root, writer, n_train, n_test_good, n_test_bad)
        for writer in writers:
            writer.wait()
    return root


class SyntheticMVTecAD(MVTecAD):
    """MVTec AD layout generated into `root` on first use: the offline demo's dataset (carpet, tile).

    Args:
        root: where the synthetic categories are written on first use (default ~/.cache/lit-anomaly/demo).
        category: carpet, tile, `all` or `carpet,tile`.
        **kwargs: the arguments every datamodule takes (image_size, batch sizes, limits, ...).
    """

    DEMO_CATEGORIES = ("carpet", "tile")
    DEFAULT_ROOT = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lit-anomaly" / "demo"

    def __init__(self, root: str | Path = DEFAULT_ROOT, category: str = "carpet", **kwargs) -> None:
        super().__init__(root, category, **kwargs)

    @classmethod
    def categories(cls, root: str | Path = DEFAULT_ROOT) -> list[str]:
        ensure_demo_dataset(Path(root).expanduser())
        return super().categories(Path(root).expanduser())

    def prepare_data(self) -> None:
        ensure_demo_dataset(self.root)

    def setup(self, stage: str | None = None) -> None:
        ensure_demo_dataset(self.root)
        super().setup(stage)


def ensure_demo_dataset(root: Path) -> Path:
    """Generate the demo dataset once; concurrent callers (DDP ranks) never see a half-written tree."""
    marker = root / ".complete"
    if marker.exists():
        return root
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=root.parent))
    except OSError as error:
        raise DatasetError(
            f"cannot create the demo's data folder {root} ({error.strerror or error}); point --data.root to a "
            "writable folder (or set XDG_CACHE_HOME)"
        ) from error
    write_synthetic(staging, "MVTecAD", SyntheticMVTecAD.DEMO_CATEGORIES, 66, 24, 24, image_size=256)
    (staging / ".complete").touch()
    try:
        staging.rename(root)
    except OSError:  # someone else finished first
        shutil.rmtree(staging, ignore_errors=True)
    return root
