"""Image and mask decoding: EXIF orientation and masks with an alpha channel."""

import numpy as np
import pytest
from PIL import Image

from lit_anomaly.data import MVTecAD, write_synthetic
from lit_anomaly.data.image_io import read_image, read_mask, shown_size

ROTATE_90_CLOCKWISE = 6  # EXIF: the stored pixels are shown turned 90 degrees clockwise


def bright_corner(width: int, height: int) -> Image.Image:
    """A dark picture with a bright block in its top-left corner."""
    pixels = np.full((height, width, 3), 30, dtype=np.uint8)
    pixels[: height // 3, : width // 3] = 230
    return Image.fromarray(pixels)


def with_orientation(image: Image.Image, path, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, exif=exif.tobytes(), quality=100)


def test_an_exif_orientation_is_honoured_as_every_viewer_shows_the_picture(tmp_path):
    stored = tmp_path / "stored.jpg"
    with_orientation(bright_corner(64, 48), stored, ROTATE_90_CLOCKWISE)
    with Image.open(stored) as image:
        assert image.size == (64, 48) and shown_size(image) == (48, 64)
    pixels = read_image(stored, (64, 48)).astype(float)  # (H, W): the shown picture is 48 wide, 64 high
    top_right, top_left = pixels[:16, 32:].mean(), pixels[:16, :16].mean()
    assert top_right > 180 and top_left < 80  # turned clockwise, the top-left block is top right


def test_a_mask_is_turned_with_its_orientation_too(tmp_path):
    mask = np.zeros((48, 64), dtype=np.uint8)
    mask[:16, :16] = 255
    path = tmp_path / "mask.jpg"
    with_orientation(Image.fromarray(mask).convert("RGB"), path, ROTATE_90_CLOCKWISE)
    read = read_mask([path], (64, 48))
    assert read[:16, 32:].mean() > 0.8 and read[:16, :16].mean() < 0.2


def square_mask(mode: str, in_alpha: bool) -> Image.Image:
    """A square of defect on a black background: in the grey or colour channels over an opaque alpha, or
    drawn in the alpha channel over black colour."""
    square = np.zeros((32, 32), dtype=np.uint8)
    square[8:16, 8:16] = 255
    colour = np.zeros_like(square) if in_alpha else square
    alpha = square if in_alpha else np.full_like(square, 255)
    return Image.fromarray(np.dstack([*[colour] * (3 if mode == "RGBA" else 1), alpha]), mode)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
@pytest.mark.parametrize("in_alpha", [False, True], ids=["opaque-background", "drawn-in-alpha"])
def test_a_mask_with_alpha_is_read_where_the_mask_is_drawn(tmp_path, mode, in_alpha):
    path = tmp_path / "mask.png"
    square_mask(mode, in_alpha).save(path)
    read = read_mask([path], (32, 32))
    expected = np.zeros((32, 32), dtype=np.uint8)
    expected[8:16, 8:16] = 1
    assert np.array_equal(read, expected)  # an opaque black background is not defect


def test_masks_with_alpha_are_noted_once_for_the_category(tmp_path):
    root = write_synthetic(tmp_path, "MVTecAD", ["tile"], 4, 2, 2, 32)
    masks = sorted((root / "tile" / "ground_truth").rglob("*.png"))
    with Image.open(masks[0]) as mask:
        mask.convert("LA").save(masks[0])
    datamodule = MVTecAD(root, "tile", image_size=32, num_workers=0)
    datamodule.setup()
    assert "1 masks carry an alpha channel" in datamodule.data_notes["masks_alpha"]
