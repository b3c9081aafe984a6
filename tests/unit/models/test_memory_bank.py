import math

import pytest
import pytorch_lightning as pl
import torch
import torchvision

from lit_anomaly.callbacks import ResultCollector, result_collector
from lit_anomaly.data import MVTecAD
from lit_anomaly.models import PaDiM, PatchCore
from lit_anomaly.models.components import (
    BackboneError,
    FeatureExtractor,
    greedy_coreset,
    image_blocks,
    largest_nearest_distances,
    nearest_distances,
    nearest_neighbors,
)
from lit_anomaly.models.components.backbones import (
    create_timm_model,
    create_unset_timm_model,
    efficientnet_lite0_state_dict,
    load_backbone_weights,
)
from lit_anomaly.models.components.batchnorm_folding import fold_batchnorm
from lit_anomaly.models.components.coreset import _greedy_batched
from lit_anomaly.models.components.same_padding import CopyFreeConv2dSame, replace_padded_copies

DETECTORS = {"PatchCore": PatchCore, "PaDiM": PaDiM}


def trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        num_sanity_val_steps=0, enable_model_summary=False, callbacks=[ResultCollector()], **kwargs,
    )  # fmt: skip


def fit_test(model, datamodule, **trainer_kwargs):
    t = trainer(**trainer_kwargs)
    t.fit(model, datamodule=datamodule)
    t.test(model, datamodule=datamodule, verbose=False)
    return result_collector(t).test_result.metrics, t


@pytest.mark.parametrize("name", list(DETECTORS))
def test_pretrained_detector_separates_defects_and_beats_random_weights(name, mvtec_root):
    metrics = {}
    for pretrained in (True, False):
        dm = MVTecAD(mvtec_root, "carpet", image_size=128, num_workers=0)
        model = DETECTORS[name](backbone="efficientnet_lite0", pretrained=pretrained)
        metrics[pretrained], _ = fit_test(model, dm)
    assert metrics[True]["image_auroc"] >= 0.95
    assert metrics[True]["pixel_auroc"] >= 0.95
    assert metrics[True]["image_auroc"] >= metrics[False]["image_auroc"]
    assert metrics[True]["pixel_aupro"] > metrics[False]["pixel_aupro"] + 0.1
    assert model.threshold_provenance["n"] == 30 and model.threshold_provenance["quantile"] == 0.995


@pytest.mark.parametrize("name", list(DETECTORS))
def test_checkpoint_round_trip_restores_threshold_and_model(name, mvtec_root, tmp_path):
    dm = MVTecAD(mvtec_root, "tile", image_size=64, num_workers=0)
    model = DETECTORS[name](backbone="efficientnet_lite0", calibration_quantile=0.9)
    t = trainer()
    t.fit(model, datamodule=dm)
    t.save_checkpoint(tmp_path / "model.ckpt")
    restored = DETECTORS[name].load_from_checkpoint(tmp_path / "model.ckpt", pretrained=False)
    assert float(restored.threshold) == float(model.threshold) and not math.isnan(float(model.threshold))
    assert restored.threshold_provenance == model.threshold_provenance
    assert torch.equal(restored.model.extractor.mean, torch.full((1, 3, 1, 1), 0.5))  # lite0 normalisation
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    model.eval(), restored.eval()
    with torch.no_grad():
        assert torch.allclose(model(images)["score"], restored(images)["score"])
    tester = trainer()
    tester.test(restored, datamodule=dm, verbose=False)  # a restored detector tests without refitting
    assert result_collector(tester).test_result.metrics["image_auroc"] is not None


def test_test_result_keeps_the_images_the_detector_saw_for_the_overlays(mvtec_root):
    dm = MVTecAD(mvtec_root, "tile", image_size=64, num_workers=0)
    model = PatchCore(backbone="efficientnet_lite0", pretrained=False)
    _, t = fit_test(model, dm)
    result, dataset = result_collector(t).test_result, dm.dataloader("test").dataset
    assert result.images.dtype == torch.uint8 and len(result.images) == len(dataset)
    for position, index in enumerate(result.index.tolist()):
        assert torch.equal(result.images[position], dataset[index]["image"])  # the loader's bytes, not re-decoded


def _plain_backbone(timm_name: str, state: dict | None = None) -> torch.nn.Module:
    """The unfolded timm features model an extractor stands for, in eval mode."""
    plain = create_timm_model(timm_name, features_only=True, out_indices=(2, 3))
    if state is not None:
        load_backbone_weights(plain, state, timm_name, "test")
    return plain.eval()


def _assert_features_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for g, w in zip(got, want, strict=True):  # folding rounds differently: 1e-5 of the features' range
        assert g.is_contiguous() and torch.allclose(g, w, rtol=1e-4, atol=1e-5 * float(w.abs().max()))


def test_offline_efficientnet_lite0_weights_load_completely():
    extractor = FeatureExtractor("efficientnet_lite0", layers=(2, 3), pretrained=True)
    assert extractor.channels == [40, 112] and extractor.strides == [8, 16]
    plain = _plain_backbone(extractor.timm_name, efficientnet_lite0_state_dict())
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _assert_features_close(extractor(images), plain((images - extractor.mean) / extractor.std))


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_lite0"])
def test_features_equal_the_plain_full_backbones_whatever_the_batch(backbone, tmp_path):
    torch.manual_seed(0)
    plain = _plain_backbone(FeatureExtractor(backbone, pretrained=False).timm_name)
    for norm in (m for m in plain.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # statistics worth folding
        norm.running_mean.uniform_(-1, 1), norm.running_var.uniform_(0.5, 2), norm.weight.data.uniform_(0.5, 2)
    torch.save(plain.state_dict(), tmp_path / "weights.pth")
    extractor = FeatureExtractor(backbone, layers=(2, 3), weights_path=tmp_path / "weights.pth")
    assert extractor.folded and not any(isinstance(m, torch.nn.BatchNorm2d) for m in extractor.modules())
    for size in ((64, 64), (61, 66)):  # TensorFlow's "SAME" pads even and odd sizes differently
        images = torch.rand(5, 3, *size)
        features = extractor(images)
        with torch.no_grad():
            _assert_features_close(features, plain((images - extractor.mean) / extractor.std))
        assert all(torch.equal(a, b[:2]) for a, b in zip(extractor(images[:2]), features, strict=True))


def test_same_convolutions_pad_inside_the_convolution_with_timms_results():
    from timm.layers import Conv2dSame

    torch.manual_seed(0)
    for kernel, stride, groups in [(3, 2, 1), (5, 2, 4), (4, 2, 1), (2, 3, 4), (3, 1, 1), ((3, 5), (2, 1), 1)]:
        timm_conv = Conv2dSame(4, 8, kernel, stride, groups=groups).eval()
        network = torch.nn.Sequential(timm_conv)
        assert replace_padded_copies(network) == 1 and type(network[0]) is CopyFreeConv2dSame
        assert network[0].weight is timm_conv.weight and network.state_dict().keys() == {"0.weight", "0.bias"}
        for height, width in [(16, 16), (15, 17), (16, 13), (1, 2)]:
            x = torch.randn(2, 4, height, width)
            with torch.no_grad():
                torch.testing.assert_close(network(x), timm_conv(x), rtol=1e-5, atol=1e-5)
    dilated = torch.nn.Sequential(Conv2dSame(4, 4, 3, 2, dilation=2))
    assert replace_padded_copies(dilated) == 0 and type(dilated[0]) is Conv2dSame  # no zero tap shifts by 2


def test_batchnorm_folds_only_where_the_convolution_feeds_nothing_else():
    class Block(torch.nn.Module):
        def __init__(self, residual: bool) -> None:
            super().__init__()
            self.residual = residual
            self.conv, self.norm = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.norm(y) + y if self.residual else self.norm(y)

    example = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for residual in (False, True):
        block = Block(residual).eval()
        block.norm.running_mean.uniform_(-1, 1), block.norm.running_var.uniform_(0.5, 2)
        with torch.no_grad():
            before = block(example)
            folded = fold_batchnorm(block, example)
            assert torch.allclose(block(example), before, atol=1e-5)
        assert [(f.conv, f.norm) for f in folded] == ([] if residual else [("conv", "norm")])
        assert isinstance(block.norm, torch.nn.BatchNorm2d) == residual  # left as it was where folding is wrong


def test_checkpoints_saved_before_batchnorm_folding_still_load(mvtec_root, tmp_path):
    model = PatchCore(backbone="efficientnet_lite0")
    _, lightning = fit_test(model, MVTecAD(mvtec_root, "tile", image_size=64, num_workers=0))
    lightning.save_checkpoint(tmp_path / "new.ckpt")
    checkpoint = torch.load(tmp_path / "new.ckpt", weights_only=False)
    state = checkpoint["state_dict"]
    prefix = "model.extractor.model."
    unfolded = _plain_backbone(model.model.extractor.timm_name, efficientnet_lite0_state_dict()).state_dict()
    for key in [k for k in state if k.startswith(prefix)]:
        del state[key]
    state.update({prefix + k: v for k, v in unfolded.items()})  # as 0.1 saved it: every block, BatchNorms apart
    torch.save(checkpoint, tmp_path / "old.ckpt")
    restored = PatchCore.load_from_checkpoint(tmp_path / "old.ckpt", pretrained=False).eval()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.eval()(images)["score"], restored(images)["score"])


def test_checkpoints_with_the_backbone_blocks_0_2_kept_still_load(mvtec_root, tmp_path):
    model = PatchCore(backbone="efficientnet_lite0")
    _, lightning = fit_test(model, MVTecAD(mvtec_root, "tile", image_size=64, num_workers=0))
    lightning.save_checkpoint(tmp_path / "new.ckpt")
    checkpoint = torch.load(tmp_path / "new.ckpt", weights_only=False)
    full = create_timm_model("tf_efficientnet_lite0", features_only=True, out_indices=(2, 3)).state_dict()
    unused = {f"model.extractor.model.{k}": v for k, v in full.items() if k.startswith(("blocks.5.", "blocks.6."))}
    assert unused and not set(unused) & set(checkpoint["state_dict"])
    checkpoint["state_dict"].update(unused)
    torch.save(checkpoint, tmp_path / "old.ckpt")
    restored = PatchCore.load_from_checkpoint(tmp_path / "old.ckpt", pretrained=False).eval()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.eval()(images)["score"], restored(images)["score"])


def test_weights_path_for_air_gapped_sites(tmp_path):
    reference = torchvision.models.resnet18().eval()
    for norm in (m for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        norm.running_mean.uniform_(-1, 1), norm.running_var.uniform_(0.5, 2)
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    extractor = FeatureExtractor("resnet18", layers=("layer2", "layer3"), weights_path=tmp_path / "resnet18.pth")
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = reference.maxpool(reference.relu(reference.bn1(reference.conv1((images - extractor.mean) / extractor.std))))
        layer2 = reference.layer2(reference.layer1(x))
        _assert_features_close(extractor(images), [layer2, reference.layer3(layer2)])
    broken = {k: v for k, v in reference.state_dict().items() if not k.startswith("layer3")}
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(BackboneError, match="missing"):
        FeatureExtractor("resnet18", layers=(2, 3), weights_path=tmp_path / "broken.pth")
    with pytest.raises(BackboneError, match="does not exist"):
        FeatureExtractor("resnet18", weights_path=tmp_path / "absent.pth")


def test_models_that_load_weights_are_built_without_random_initialisation():
    """Loading overwrites every weight, so the model is built on the meta device (the air-gapped and pretrained
    tests check what loads into it); one with buffers that no state dict holds (coatnet's relative position
    indices) is built on the CPU."""
    assert all(p.is_meta for p in create_unset_timm_model("test_resnet", features_only=True).parameters())
    coatnet = create_unset_timm_model("test_coatnet", features_only=True)
    assert not any(t.is_meta for t in (*coatnet.parameters(), *coatnet.buffers()))


def test_a_backbone_with_fixed_size_attention_gives_its_features_at_its_size(tmp_path):
    """coatnet's relative-position attention takes 160 px only: BatchNorm folding traces an example of that size,
    and the image-size check names it."""
    import timm

    reference = timm.create_model("test_coatnet", features_only=True, out_indices=(2, 3)).eval()
    torch.save(reference.state_dict(), tmp_path / "coatnet.pth")
    extractor = FeatureExtractor("test_coatnet", layers=(2, 3), weights_path=tmp_path / "coatnet.pth")
    images = torch.rand(2, 3, 160, 160, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _assert_features_close(extractor(images), reference((images - extractor.mean) / extractor.std))
    model = PatchCore(backbone="test_coatnet", pretrained=False)
    model.check_image_size((160, 160))
    with pytest.raises(ValueError, match=r"--data.image_size \[64, 64\] does not fit .* takes 160 x 160 px"):
        model.check_image_size((64, 64))


def test_channels_last_feature_models_give_channels_first_maps():
    """timm's mambaout (like swin) returns (N, h, w, C) features; the teacher and STFPM's student give (N, C, h, w)."""
    import timm

    from lit_anomaly.models.components.student import StudentNetwork

    reference = timm.create_model("test_mambaout", features_only=True, out_indices=(1, 2)).eval()
    extractor = FeatureExtractor("test_mambaout", layers=(1, 2), pretrained=False, canonical_batch=None)
    extractor.model.load_state_dict(reference.state_dict())
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = [f.permute(0, 3, 1, 2) for f in reference((images - extractor.mean) / extractor.std)]
        _assert_features_close(extractor(images), want)
        student = StudentNetwork(extractor, extractor.out_indices)(images)
    assert [f.shape[1] for f in extractor(images)] == [f.shape[1] for f in student] == extractor.channels


def test_pretrained_download_failure_says_what_works_offline(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(BackboneError, match="weights_path"):
        FeatureExtractor("resnet18", pretrained=True)


def naive_coreset(x: torch.Tensor, n: int, start: int) -> list[int]:
    chosen, distances = [start], torch.cdist(x, x[start : start + 1]).squeeze(1)
    for _ in range(n - 1):
        nxt = int(distances.argmax())
        chosen.append(nxt)
        distances = torch.minimum(distances, torch.cdist(x, x[nxt : nxt + 1]).squeeze(1))
    return chosen


def test_greedy_coreset_matches_naive_k_center():
    x = torch.randn(500, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    selected = greedy_coreset(x, 40, projection_dim=None, seed=3).tolist()
    assert selected == naive_coreset(x, 40, selected[0])
    assert len(set(selected)) == 40


def one_centre_per_step(x: torch.Tensor, n_select: int, start: int) -> list[int]:
    """Greedy k-center as a loop of one matrix-vector product per centre, in the batched selection's arithmetic."""
    squared_norms, chosen = (x * x).sum(1), [start]
    min_distances = torch.full((len(x),), float("inf"))
    for _ in range(n_select - 1):
        distances = torch.addmv(squared_norms, x, x[chosen[-1]], alpha=-2.0).add_(squared_norms[chosen[-1]])
        torch.minimum(min_distances, distances, out=min_distances)
        chosen.append(int(min_distances.argmax()))
    return chosen


@pytest.mark.parametrize("batch", [1, 16, 256, 5000])
def test_batched_coreset_selects_what_one_centre_per_step_selects(batch):
    clustered = torch.randn(20, 32, generator=torch.Generator().manual_seed(1)) * 4
    x = clustered.repeat_interleave(200, 0) + torch.randn(4000, 32, generator=torch.Generator().manual_seed(2))
    assert _greedy_batched(x, 400, 7, batch).tolist() == one_centre_per_step(x, 400, 7)
    projected = greedy_coreset(x, 40, projection_dim=8, seed=3)
    assert len(set(projected.tolist())) == 40


def test_image_blocks_cover_every_image_once_in_near_equal_groups():
    assert image_blocks(10, 100, None) == [range(10)]
    blocks = image_blocks(10, 100, 350)  # at most 3 images (300 rows) a block: four groups of 2-3 images
    assert [len(b) for b in blocks] == [2, 3, 2, 3] and [i for b in blocks for i in b] == list(range(10))
    assert image_blocks(3, 100, 1) == [range(0, 1), range(1, 2), range(2, 3)]  # never less than one image
    assert image_blocks(0, 100, 350) == [range(0, 0)]


def test_image_blocks_of_a_unified_fit_never_span_two_categories():
    """Blocks of 3 images over categories of 4 and 5: each category is chosen in its own blocks, so it keeps
    the share of the bank it has when fitted alone (a block spanning two gave the more varied one more rows)."""
    assert image_blocks(9, 100, 350, groups=[4, 5]) == [range(0, 2), range(2, 4), range(4, 6), range(6, 9)]
    assert image_blocks(9, 100, None, groups=[4, 5]) == [range(0, 4), range(4, 9)]
    with pytest.raises(ValueError, match="groups of 8 images for 9 images"):
        image_blocks(9, 100, 350, groups=[4, 4])


def test_nearest_neighbors_match_cdist():
    generator = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(300, 24, generator=generator), torch.randn(90, 24, generator=generator)
    distances, indices = nearest_neighbors(queries, bank, k=3, max_elements=1000)  # many chunks
    reference = torch.cdist(queries, bank).topk(3, largest=False)
    assert torch.equal(indices, reference.indices)
    assert torch.allclose(distances, reference.values, atol=1e-4)
    distances, indices = nearest_neighbors(queries, bank, tile=(64, 32))  # k = 1: tiles of queries and bank rows
    assert torch.equal(indices, reference.indices[:, :1]) and torch.allclose(
        distances, reference.values[:, :1], atol=1e-4
    )
    alone = nearest_neighbors(queries[:5], bank, tile=(64, 32))[0]
    assert torch.equal(alone, distances[:5])  # a query's distance does not depend on the others in its batch
    assert torch.equal(nearest_distances(queries, bank, tile=(64, 32)), distances[:, 0])


@pytest.mark.parametrize("k", [1, 5])
def test_largest_nearest_distances_equal_the_full_search(k):
    generator = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(300, 24, generator=generator), torch.randn(200, 24, generator=generator)
    nearby, far = bank[:20], [bank[20:120], bank[120:]]  # bounds from a part of the bank, as a block's own rows
    bounds, norms = nearest_distances(queries, nearby), [(b * b).sum(1) for b in far]
    searched = nearest_distances(queries, bank[20:], tile=(8, 1024))
    expected = torch.minimum(bounds, searched).topk(k)
    found = largest_nearest_distances(queries, bounds, far, norms, k, chunk=8)
    assert torch.equal(found, expected.indices)  # which queries, largest first
    infinite = torch.full((300,), torch.inf)
    assert torch.equal(largest_nearest_distances(queries, infinite, far, norms, k, chunk=8), searched.topk(k).indices)
    nothing = largest_nearest_distances(queries, bounds, [far[0][:0]], [norms[0][:0]], k)
    assert torch.equal(nothing, bounds.topk(k).indices)  # nothing to search


def test_patchcore_reweighting_and_bad_arguments(mvtec_root):
    dm = MVTecAD(mvtec_root, "tile", image_size=64, num_workers=0)
    metrics, _ = fit_test(PatchCore(backbone="efficientnet_lite0", reweight=True), dm)
    assert metrics["image_auroc"] >= 0.9
    with pytest.raises(ValueError, match="coreset_ratio"):
        PatchCore(backbone="efficientnet_lite0", coreset_ratio=0)
    with pytest.raises(ValueError, match="calibration_quantile"):
        PaDiM(backbone="efficientnet_lite0", calibration_quantile=1.2)


def test_no_calibration_normals_leave_threshold_metrics_null(mvtec_root):
    dm = MVTecAD(mvtec_root, "tile", image_size=64, num_workers=0)
    metrics, _ = fit_test(PatchCore(backbone="efficientnet_lite0", calibration="none"), dm)
    assert metrics["image_auroc"] is not None and metrics["image_f1"] is None


def test_separable_blur_equals_torchvisions_gaussian_blur():
    from torchvision.transforms.v2.functional import gaussian_blur

    from lit_anomaly.models.components import blur_kernel_size, smooth

    maps = torch.rand(3, 1, 40, 56, generator=torch.Generator().manual_seed(0))
    for sigma in (1.0, 4.0):
        size = blur_kernel_size(sigma)
        assert torch.allclose(smooth(maps, sigma), gaussian_blur(maps, [size, size], [sigma, sigma]), atol=1e-6)
    assert smooth(maps, 0.0) is maps
