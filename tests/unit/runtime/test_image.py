"""The runtime's decoding matches the training loader's to the bit, without torch."""

import numpy as np
import pytest
import torch
from PIL import Image

from lit_anomaly.data.image_io import read_image
from lit_anomaly.runtime.image import ImageError, as_rgb, decode_image, resize_map, resize_uint8


def torch_resize(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    planes = torch.from_numpy(np.ascontiguousarray(array)).view(*array.shape[:2], -1).permute(2, 0, 1)[None]
    resized = torch.nn.functional.interpolate(planes, size=size, mode="bilinear", antialias=True)[0]
    return resized.permute(1, 2, 0).reshape(*size, *array.shape[2:]).numpy()


@pytest.mark.parametrize("seed", range(12))
def test_resize_is_torchs_uint8_antialiased_kernel_to_the_bit(seed):
    rng = np.random.default_rng(seed)
    source = tuple(int(v) for v in rng.integers(5, 700, size=2))
    target = tuple(int(v) for v in rng.integers(5, 400, size=2))
    shape = source if seed % 2 else (*source, 3)  # grey planes and colour images, shrunk and enlarged
    array = rng.integers(0, 256, size=shape, dtype=np.uint8)
    assert np.array_equal(resize_uint8(array, target), torch_resize(array, target))


def test_a_decoded_file_equals_what_the_loader_reads(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (300, 410, 3), dtype=np.uint8)).save(tmp_path / "frame.png")
    Image.fromarray(rng.integers(0, 256, (300, 410), dtype=np.uint8)).save(tmp_path / "grey.png")
    for name in ("frame.png", "grey.png"):
        ours = as_rgb(resize_uint8(decode_image(tmp_path / name, (64, 80), 10**8)[0], (64, 80)))
        assert np.array_equal(ours, read_image(tmp_path / name, (64, 80)))


def test_a_map_is_resized_as_torch_interpolates_it():
    anomaly_map = np.random.default_rng(0).random((16, 24)).astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(anomaly_map)[None, None], (50, 37), mode="bilinear")
    assert np.allclose(resize_map(anomaly_map, (50, 37)), expected[0, 0].numpy(), atol=1e-6)


def test_float_images_hold_0_to_1_and_other_values_are_refused(tmp_path):
    Image.fromarray(np.full((20, 20), 0.5, dtype=np.float32), mode="F").save(tmp_path / "unit.tiff")
    assert decode_image(tmp_path / "unit.tiff", (20, 20), 10**8)[0][0, 0].tolist() == [128, 128, 128]
    Image.fromarray(np.full((20, 20), 200.0, dtype=np.float32), mode="F").save(tmp_path / "bytes.tiff")
    with pytest.raises(ImageError, match=r"expected 0\.\.1"):
        decode_image(tmp_path / "bytes.tiff", (20, 20), 10**8)
