"""report.html, `lit-anomaly compare` and the statistics behind them."""

import json
import re
import shutil
import subprocess

import html5lib
import numpy as np
import pytest
import torch
from PIL import Image

from lit_anomaly.cli import main
from lit_anomaly.data import write_synthetic
from lit_anomaly.metrics.classification import IMAGE_KEYS, image_metrics
from lit_anomaly.metrics.intervals import bootstrap_intervals, image_statistics
from lit_anomaly.pipelines import run_benchmark
from lit_anomaly.reporting.statistics import delong_test, rank_summary

CASES = 2  # hardest cases per kind
SECTION = re.compile(r"<section id='category-([^']+)'>(.*?)</section>", re.S)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """PatchCore and PaDiM over two synthetic categories, and a third whose train split is empty (fails)."""
    base = tmp_path_factory.mktemp("report")
    root = write_synthetic(base / "data", "MVTecAD", ["carpet", "tile", "wood"], 12, 6, 6, 64)
    for image in (root / "wood" / "train" / "good").iterdir():
        image.unlink()
    data = {"class_path": "MVTecAD", "init_args": {"root": str(root), "image_size": 64, "num_workers": 0}}
    folders = {}
    for name in ("PatchCore", "PaDiM"):
        folders[name] = base / name
        run_benchmark(
            model={"class_path": name, "init_args": {"backbone": "efficientnet_lite0", "calibration_quantile": 0.9}},
            data=data,
            category="all",
            trainer={"accelerator": "cpu"},
            run={"output_dir": str(folders[name]), "html_cases": CASES},
        )
    return folders


def sections(page: str) -> dict[str, str]:
    return dict(SECTION.findall(page))


def test_report_html_is_one_self_contained_valid_page(runs):
    page = (runs["PatchCore"] / "report.html").read_text()
    html5lib.HTMLParser(strict=True).parse(page)  # raises on any parse error
    assert not re.search(r"(?:https?|ftp)://", page)  # figures are base64 data URIs: nothing inside them shows
    assert not re.search(r"""(?:src|href)=["'](?!data:|#)""", page), "every image and link is inline or in-page"
    assert "<script" not in page and "url(" not in page
    found = sections(page)
    assert set(found) == {"carpet", "tile", "wood"}
    assert "mean ± std over 2 categories" in page  # the failed one has no metrics
    for category in ("carpet", "tile"):
        # ROC, precision-recall, score histogram, PRO curve, and the hardest cases of both kinds
        assert found[category].count("<img") == 4 + 2 * CASES
        assert len(found[category].encode()) < 1_000_000
    assert len(list((runs["PatchCore"] / "categories" / "carpet" / "hard_cases").glob("*.png"))) == 2 * CASES


def test_a_failed_category_shows_its_error_in_the_page(runs):
    page = (runs["PatchCore"] / "report.html").read_text()
    report = json.loads((runs["PatchCore"] / "report.json").read_text())
    error = report["per_category"]["wood"]["error"]
    assert report["per_category"]["wood"]["status"] == "failed" and "empty train split" in error
    assert "empty train split" in sections(page)["wood"] and "<img" not in sections(page)["wood"]


def test_a_category_name_the_folder_sanitises_still_finds_its_files(runs, tmp_path):
    from lit_anomaly.reporting.html import RunPage

    folder = tmp_path / "odd"
    shutil.copytree(runs["PaDiM"], folder)
    report = json.loads((folder / "report.json").read_text())
    report["per_category"] = {"my tile": {**report["per_category"]["tile"], "category": "my tile"}}
    (folder / "categories" / "tile").rename(folder / "categories" / "my-tile")  # RunFolder.category_dir's name
    page = RunPage(folder).render(report)
    assert sections(page)["my tile"].count("<img") == 4 + 2 * CASES
    assert "value (one category)" in page and "±" not in page  # no "± 0.000" spread of a single value


def test_report_json_carries_intervals_around_each_metric(runs):
    result = json.loads((runs["PaDiM"] / "categories" / "tile" / "report.json").read_text())
    for key, value in result["metrics"].items():
        interval = result["metric_intervals"].get(key)
        if key in IMAGE_KEYS and value is not None and interval is not None:
            assert interval[0] - 1e-9 <= value <= interval[1] + 1e-9, key
    assert result["threshold_provenance"]["score_range"][0] <= result["threshold_provenance"]["score_range"][1]
    assert len(result["curves"]["pro"]["fpr"]) == len(result["curves"]["pro"]["pro"])


def test_html_false_writes_no_page(tmp_path):
    root = write_synthetic(tmp_path / "data", "MVTecAD", ["tile"], 8, 3, 3, 48)
    run_benchmark(
        model={"class_path": "PaDiM", "init_args": {"backbone": "efficientnet_lite0"}},
        data={"class_path": "MVTecAD", "init_args": {"root": str(root), "image_size": 48, "num_workers": 0}},
        trainer={"accelerator": "cpu"},
        category="tile",
        run={"output_dir": str(tmp_path / "run"), "html": False},
    )
    assert (tmp_path / "run" / "report.json").exists() and not (tmp_path / "run" / "report.html").exists()
    assert not (tmp_path / "run" / "categories" / "tile" / "hard_cases").exists()


def test_a_failing_overlay_costs_the_category_nothing(tmp_path, monkeypatch, capsys):
    import lit_anomaly.reporting.hard_cases as pipeline

    def broken(*args, **kwargs):
        raise OSError("disk gone")

    monkeypatch.setattr(pipeline, "overlay_png", broken)
    root = write_synthetic(tmp_path / "data", "MVTecAD", ["tile"], 8, 3, 3, 48)
    report = run_benchmark(
        model={"class_path": "PaDiM", "init_args": {"backbone": "efficientnet_lite0"}},
        data={"class_path": "MVTecAD", "init_args": {"root": str(root), "image_size": 48, "num_workers": 0}},
        category="tile",
        trainer={"accelerator": "cpu"},
        run={"output_dir": str(tmp_path / "run")},
    )
    result = report["per_category"]["tile"]
    assert result["status"] == "ok" and result["hard_cases"] == [] and result["metrics"]["image_auroc"] is not None
    assert "no hard-case overlays (OSError: disk gone)" in capsys.readouterr().err
    assert "<section id='category-tile'>" in (tmp_path / "run" / "report.html").read_text()


def test_compare_tables_match_both_reports(runs, tmp_path, capsys):
    output = tmp_path / "compare.html"
    assert main(["compare", str(runs["PatchCore"]), str(runs["PaDiM"]), "--output", str(output)]) == 0
    document = json.loads(capsys.readouterr().out)
    reports = [json.loads((runs[name] / "report.json").read_text()) for name in ("PatchCore", "PaDiM")]
    assert document["categories"] == ["carpet", "tile", "wood"]
    for key, by_category in document["metrics"].items():
        for category, values in by_category.items():
            expected = [
                r["per_category"][category]["metrics"].get(key)
                if r["per_category"][category]["status"] == "ok"
                else None
                for r in reports
            ]
            assert values == expected, (key, category)
    for key in ("image_auroc", "pixel_auroc"):
        assert document["mean"][key] == pytest.approx([r["mean_metrics"][key] for r in reports])
    assert (
        document["paired_image_auroc"]["carpet"][0] is None and "p_value" in document["paired_image_auroc"]["carpet"][1]
    )
    page = output.read_text()
    html5lib.HTMLParser(strict=True).parse(page)
    assert page.count("<img") == 2  # one ROC figure per category with results (wood failed in both)
    assert document["finished_categories"] == ["carpet", "tile"]
    assert "Mean ± std over the 2 categories every run finished" in page
    assert "Not in the means (failed in at least one run): wood" in page


@pytest.mark.parametrize("state", ["every-category-failed", "still-running"])
def test_compare_with_a_run_that_finished_no_category_exits_cleanly(runs, tmp_path, capsys, state):
    other = shutil.copytree(runs["PaDiM"], tmp_path / "other")
    report = json.loads((other / "report.json").read_text())
    if state == "still-running":  # its first category has not finished: report.json is written from the start
        report["per_category"] = {}
        shutil.rmtree(other / "categories")
    else:
        for category in report["per_category"]:
            report["per_category"][category] = {"status": "failed", "error": "RuntimeError: out of memory"}
    (other / "report.json").write_text(json.dumps(report))
    output = tmp_path / "c.html"
    assert main(["compare", str(runs["PatchCore"]), str(other), "--output", str(output)]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["ranks"]["mean_rank"] == [None, None] and document["finished_categories"] == []
    html5lib.HTMLParser(strict=True).parse(output.read_text())


def test_compare_means_cover_only_the_categories_every_run_finished(runs, tmp_path, capsys):
    # a category one run failed must leave every run's mean, or the runs are averaged over different categories
    padim = shutil.copytree(runs["PaDiM"], tmp_path / "PaDiM")
    report = json.loads((padim / "report.json").read_text())
    report["per_category"]["tile"] = {"status": "failed", "error": "RuntimeError: out of memory"}
    (padim / "report.json").write_text(json.dumps(report))
    assert main(["compare", str(runs["PatchCore"]), str(padim), "--output", str(tmp_path / "c.html")]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["finished_categories"] == ["carpet"]
    patchcore = json.loads((runs["PatchCore"] / "report.json").read_text())["per_category"]
    assert document["metrics"]["image_auroc"]["tile"][0] == patchcore["tile"]["metrics"]["image_auroc"]  # still shown
    assert document["mean"]["image_auroc"][0] == patchcore["carpet"]["metrics"]["image_auroc"]
    assert document["paired_image_auroc"]["tile"] == [None, None]  # its per-image scores are still on disk
    page = (tmp_path / "c.html").read_text()
    assert (
        "On the one category every run finished, carpet" in page and "failed in at least one run): tile, wood" in page
    )


def test_compare_of_a_run_with_itself_finds_no_significant_difference(runs, tmp_path, capsys):
    folder = str(runs["PaDiM"])
    assert main(["compare", folder, folder, "--output", str(tmp_path / "same.html")]) == 0
    document = json.loads(capsys.readouterr().out)
    assert all(not tests[1]["significant"] for tests in document["paired_image_auroc"].values() if tests[1])


def test_compare_of_one_category_shows_values_without_a_spread(runs, tmp_path, capsys):
    folders = []
    for name in ("PatchCore", "PaDiM"):
        folders.append(shutil.copytree(runs[name], tmp_path / name))
        report = json.loads((folders[-1] / "report.json").read_text())
        report["categories"], report["per_category"] = ["tile"], {"tile": report["per_category"]["tile"]}
        (folders[-1] / "report.json").write_text(json.dumps(report))
    assert main(["compare", *map(str, folders), "--output", str(tmp_path / "one.html")]) == 0
    assert json.loads(capsys.readouterr().out)["categories"] == ["tile"]
    page = (tmp_path / "one.html").read_text()
    assert "On the one shared category, tile" in page and "±" not in page


def test_compare_refuses_runs_of_other_datasets(runs, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(runs["PaDiM"], other)
    report = json.loads((other / "report.json").read_text())
    (other / "report.json").write_text(json.dumps({**report, "dataset": "VisA"}))
    assert main(["compare", str(runs["PatchCore"]), str(other), "--output", str(tmp_path / "x.html")]) == 2
    assert "same dataset" in capsys.readouterr().err and not (tmp_path / "x.html").exists()


def test_compare_names_a_missing_run_folder_apart_from_one_without_a_report(runs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for folder, said in (("missing", "no such run folder"), ("empty", "no readable report.json")):
        assert (
            main(["compare", str(runs["PatchCore"]), str(tmp_path / folder), "--output", str(tmp_path / "x.html")]) == 2
        )
        assert f"lit-anomaly: error: {tmp_path / folder}: {said}" in capsys.readouterr().err


def test_compare_refuses_an_output_it_cannot_write_before_reading_the_runs(runs, tmp_path, capsys, monkeypatch):
    both = [str(runs["PatchCore"]), str(runs["PaDiM"])]
    assert main(["compare", *both, "--output", str(tmp_path / "missing" / "x.html")]) == 2
    assert "folder " + str(tmp_path / "missing") + " does not exist" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()  # it was created before
    import lit_anomaly.reporting.compare as compare

    def full_disk(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(compare, "write_atomic", full_disk)
    assert main(["compare", *both, "--output", str(tmp_path / "x.html")]) == 2
    error = capsys.readouterr().err
    assert "cannot write the page: No space left on device" in error and "Traceback" not in error


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_chromium_renders_both_pages(runs, tmp_path):
    compare = tmp_path / "compare.html"
    assert main(["compare", str(runs["PatchCore"]), str(runs["PaDiM"]), "--output", str(compare)]) == 0
    for page in (runs["PatchCore"] / "report.html", compare):
        shot = tmp_path / f"{page.stem}.png"
        subprocess.run(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--screenshot={shot}",
             "--window-size=1280,1600", page.as_uri()],
            capture_output=True, timeout=120, check=True,
        )  # fmt: skip
        pixels = np.asarray(Image.open(shot).convert("RGB"))
        assert pixels.shape[:2] == (1600, 1280)
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # text, tables and plots, not a blank page


# ---- statistics against slow references --------------------------------------------------------------


def scores_and_labels(seed: int, n: int = 40, shift: float = 1.0):
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.4).astype(int)
    labels[:2], labels[2:4] = 0, 1
    scores = np.round(rng.normal(size=n) + shift * labels, 1)  # rounded: ties on purpose
    return scores, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_statistics_equal_the_metrics_on_every_resample(seed):
    scores, labels = scores_and_labels(seed)
    threshold = float(np.median(scores))
    statistics = image_statistics(threshold)
    rng = np.random.default_rng(seed)
    normal, defect = scores[labels == 0], scores[labels == 1]
    for _ in range(5):
        a, b = rng.choice(normal, len(normal)), rng.choice(defect, len(defect))
        expected, _ = image_metrics(torch.tensor(np.r_[a, b]), torch.tensor([0] * len(a) + [1] * len(b)), threshold)
        for key, statistic in statistics.items():
            value = float(statistic(a[None], b[None])[0])
            assert value == pytest.approx(expected[key], abs=1e-6) or (np.isnan(value) and expected[key] is None)


def test_bootstrap_interval_covers_the_estimate_and_is_seeded():
    scores, labels = scores_and_labels(3)
    point, _ = image_metrics(torch.tensor(scores), torch.tensor(labels), 0.5)
    intervals = bootstrap_intervals(scores, labels, 0.5, seed=7)
    assert intervals == bootstrap_intervals(scores, labels, 0.5, seed=7)
    for key in IMAGE_KEYS:
        low, high = intervals[key]
        assert low <= point[key] + 1e-9 and point[key] <= high + 1e-9 and high - low < 0.8


def test_an_interval_undefined_in_some_resamples_is_null_without_a_warning(recwarn):
    """Four defects, one above the threshold: a fifth of the resamples flag nothing, so precision has no
    interval. scipy warned (DegenerateDataWarning, about "BCa") into every fit+test's output."""
    scores, labels = [0.1, 0.2, 0.3, 0.4, 0.2, 0.3, 0.35, 0.9], [0, 0, 0, 0, 1, 1, 1, 1]
    intervals = bootstrap_intervals(scores, labels, 0.5)
    assert intervals["image_precision"] is None and intervals["image_recall"] == [0.0, 0.75]
    assert not [w for w in recwarn if "confidence interval" in str(w.message)]


def slow_delong(a, b, labels):
    """DeLong et al. (1988) from the pairwise kernel, no ranks."""
    from scipy.stats import norm

    def components(scores):
        defect, normal = scores[labels == 1], scores[labels == 0]
        psi = (defect[:, None] > normal[None]) + 0.5 * (defect[:, None] == normal[None])
        return psi.mean(1), psi.mean(0)

    (a10, a01), (b10, b01) = components(np.asarray(a)), components(np.asarray(b))
    s10, s01 = np.cov([a10, b10]), np.cov([a01, b01])
    variance = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / len(a10) + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / len(a01)
    z = (a10.mean() - b10.mean()) / np.sqrt(variance)
    return z, 2 * norm.sf(abs(z))


def test_delong_matches_the_pairwise_reference_and_its_verdicts():
    scores, labels = scores_and_labels(4, n=60, shift=0.8)
    other = np.round(scores + np.random.default_rng(5).normal(scale=1.0, size=len(scores)), 1)
    test = delong_test(scores, other, labels)
    z, p = slow_delong(scores, other, labels)
    assert test.z == pytest.approx(z) and test.p_value == pytest.approx(p)
    assert delong_test(scores, scores, labels).p_value == 1.0 and not delong_test(scores, scores, labels).significant
    separated = labels * 10.0 + np.random.default_rng(6).normal(scale=0.1, size=len(labels))
    noise = np.random.default_rng(7).normal(size=len(labels))
    assert delong_test(separated, noise, labels).significant


def test_rank_summary_and_friedman():
    from scipy.stats import friedmanchisquare

    runs = [{"a": 0.9, "b": 0.8, "c": 0.7}, {"a": 0.95, "b": 0.85, "c": 0.75}, {"a": 0.5, "b": 0.6, "c": None}]
    summary = rank_summary(runs, "image_auroc")
    assert summary.categories == ["a", "b"] and summary.mean_rank == [2.0, 1.0, 3.0]
    assert summary.friedman_p == pytest.approx(friedmanchisquare([0.9, 0.8], [0.95, 0.85], [0.5, 0.6]).pvalue)
    assert rank_summary(runs[:2], "image_auroc").friedman_p is None
