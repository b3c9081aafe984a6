"""The high-resolution mode: tiles that stitch without seams, a bounded bank, a top-k image score, and
leave-one-out that is still a refit without the image."""

import copy

import pytest
import torch

from lit_anomaly.data import write_synthetic
from lit_anomaly.models import PaDiM, PatchCore
from lit_anomaly.models.components import FeatureExtractor, TileGrid
from lit_anomaly.models.components.tiling import tile_axis
from lit_anomaly.models.patchcore.torch_model import PatchCoreModel

MODE = {"tile_size": 32, "tile_overlap": 16, "score_top_k": 3}


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("highres"), "MVTecAD", ["tile"], 6, 2, 2, image_size=64)


@pytest.mark.parametrize(("size", "tile", "overlap"), [(768, 256, 64), (2048, 512, 96), (100, 256, 64), (96, 32, 0)])
def test_tiles_cover_the_image_and_their_parts_meet_inside_the_overlaps(size, tile, overlap):
    axis = tile_axis(size, tile, overlap, align=16 if size % 16 == 0 else 4)
    assert axis.starts[0] == 0 and axis.starts[-1] + axis.length == size and axis.bounds == tuple(sorted(axis.bounds))
    assert axis.bounds[0] == 0 and axis.bounds[-1] == size and len(axis.bounds) == len(axis.starts) + 1
    for i, start in enumerate(axis.starts):  # each tile gives a part that lies inside it
        assert start <= axis.bounds[i] < axis.bounds[i + 1] <= start + axis.length
    assert axis.length <= tile and all(
        b - a >= overlap - 16 for a, b in zip(axis.starts[1:], [s + axis.length for s in axis.starts], strict=False)
    )


def test_a_constant_feature_field_gives_a_constant_map_across_tile_borders():
    model = PatchCoreModel("efficientnet_lite0", pretrained=False, blur_sigma=0.0, tile_size=48, tile_overlap=16)
    extractor = model.extractor
    grid = extractor.tile_grid((256, 320))
    assert grid is not None and len(grid) >= 36  # tile borders inside the image on both axes

    def constant(tiles: torch.Tensor) -> list[torch.Tensor]:
        return [
            torch.full((len(tiles), c, tiles.shape[-2] // s, tiles.shape[-1] // s), 0.5)
            for c, s in zip(extractor.channels, extractor.strides, strict=True)
        ]

    extractor._extract = constant
    model.memory_bank = torch.zeros(4, model.feature_dim)
    maps = model(torch.rand(2, 3, 256, 320))["anomaly_map"]
    # the avg-pool's zero padding lowers the image's own border (two cells of the stride-16 stage), not the tiles'
    inner = maps[..., 64:-64, 64:-64]
    assert torch.equal(inner, torch.full_like(inner, float(inner[0, 0, 0, 0])))


def test_tiles_with_the_receptive_field_as_overlap_reproduce_the_whole_image_features():
    torch.manual_seed(0)
    whole = FeatureExtractor("resnet18", layers=(1,), pretrained=False)
    tiled = FeatureExtractor("resnet18", layers=(1,), pretrained=False, tile_size=128, tile_overlap=60)
    tiled.load_state_dict(whole.state_dict())
    images = torch.rand(3, 3, 160, 192, generator=torch.Generator().manual_seed(1))
    assert tiled.tile_grid((160, 192)) is not None
    with torch.no_grad():
        (expected,), (got,) = whole(images), tiled(images)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5 * float(expected.abs().max()))


def test_tile_grid_cuts_tile_major_and_stitches_back_the_identity():
    grid = TileGrid.covering((64, 96), 32, 16, 8)
    images = torch.arange(2 * 64 * 96, dtype=torch.float32).view(2, 1, 64, 96)
    tiles = grid.cut(images)
    assert tiles.shape == (2 * len(grid), 1, 32, 32) and torch.equal(tiles[1], images[0, :, :32, 16:48])
    assert torch.equal(grid.stitch(tiles, 1), images)  # stride 1: the pixels themselves come back in place


def test_bank_size_bounds_the_memory_bank(fit_tiny, small_root):
    model, _ = fit_tiny(PatchCore, small_root, 64, coreset_ratio=0.5, bank_size=50, **MODE)
    assert 40 <= len(model.model.memory_bank) <= 60  # each block its share of 50 rows, rounded
    unbounded, _ = fit_tiny(PatchCore, small_root, 64, coreset_ratio=0.5, **MODE)
    assert len(unbounded.model.memory_bank) > 3 * len(model.model.memory_bank)


def test_leave_one_out_in_the_mode_equals_a_refit_without_the_image(fit_tiny, small_root):
    """All patches in the bank (ratio 1): leaving an image out is exactly a refit on the other five, all of its
    tiles' patches gone together; its score is the mean of its three farthest patches."""
    model, images = fit_tiny(PatchCore, small_root, 64, coreset_ratio=1.0, **MODE)
    torch_model = model.model
    with torch.no_grad():
        features = torch_model.embed(images).permute(0, 2, 3, 1).half().float()  # as fit stores them
    refits = []
    for left_out in range(6):
        refit = copy.deepcopy(torch_model)
        refit.fit(features[[i for i in range(6) if i != left_out]])
        refits.append(float(refit.score(features[left_out].flatten(0, 1)[None], refit.memory_bank)[1]))
    brute_force = [
        float(torch.cdist(features[i].flatten(0, 1), features[[j for j in range(6) if j != i]].flatten(0, 2))
              .amin(1).topk(3).values.mean())
        for i in range(6)
    ]  # fmt: skip
    assert model.calibration.scores.tolist() == pytest.approx(sorted(refits), rel=1e-5)
    assert sorted(refits) == pytest.approx(sorted(brute_force), rel=1e-4)


def test_top_k_image_score_is_the_mean_of_the_farthest_patches(fit_tiny, small_root):
    model, images = fit_tiny(PatchCore, small_root, 64, coreset_ratio=0.5, **MODE)
    torch_model = model.model
    with torch.no_grad():
        embedding = torch_model.embed(images[:2])
        scores = torch_model(images[:2])["score"]
    patches = embedding.flatten(2).transpose(1, 2)
    distances = torch.cdist(patches, torch_model.memory_bank[None].expand(2, -1, -1)).amin(2)
    assert scores.tolist() == pytest.approx(distances.topk(3, dim=1).values.mean(1).tolist(), rel=1e-4)


def test_padim_takes_the_mode_too(fit_tiny, small_root):
    model, _ = fit_tiny(PaDiM, small_root, 64, n_features=12, layers=(1, 2), **MODE)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        output = model(images)
    maps = output["anomaly_map"].flatten(1)
    assert output["score"].tolist() == pytest.approx(maps.topk(3, dim=1).values.mean(1).tolist())
    assert model.calibration.n == 6


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tile_size": 40}, "tile_size must be a multiple of 16"),
        ({"tile_size": 32, "tile_overlap": 20}, "tile_overlap must be 0 to tile_size / 2"),
        ({"bank_size": 0}, "bank_size must be 1 or more"),
        ({"score_top_k": 0}, "score_top_k must be 1 or more"),
    ],
)
def test_bad_mode_flags_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PatchCore(backbone="efficientnet_lite0", pretrained=False, **kwargs)


def test_a_tiled_size_off_the_stride_is_named_before_fitting(small_root):
    model = PatchCore(backbone="efficientnet_lite0", pretrained=False, tile_size=32)
    with pytest.raises(ValueError, match=r"--data.image_size \[72, 72\] does not fit .*multiples of 16"):
        model.check_image_size((72, 72))
