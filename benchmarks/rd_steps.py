"""WIP: fit a trained detector for N steps on a generated category and print image AUROC (python benchmarks/rd_steps.py ReverseDistillation 400 grid)."""
import sys, time, json
import pytorch_lightning as pl, torch
from lit_anomaly.callbacks import ResultCollector, result_collector
from lit_anomaly.data import MVTecAD, write_synthetic
from pathlib import Path
name, steps, category = sys.argv[1], int(sys.argv[2]), sys.argv[3]
root = Path("/tmp/rd/data")
if not (root / ".complete").exists():
    write_synthetic(root, "MVTecAD", ["carpet", "tile", "grid"], 60, 20, 20, image_size=128); (root / ".complete").touch()
from lit_anomaly.models import MODELS
pl.seed_everything(0, verbose=False)
model = MODELS[name](backbone="efficientnet_lite0", layers=[1, 2, 3])
dm = MVTecAD(root, category, image_size=128, num_workers=2, train_batch_size=32)
t = time.perf_counter()
tr = pl.Trainer(accelerator="cpu", max_steps=steps, max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=[ResultCollector()], enable_model_summary=False)
tr.fit(model, datamodule=dm); fit = time.perf_counter() - t
tr.test(model, datamodule=dm, verbose=False)
m = result_collector(tr).test_result.metrics
print(json.dumps({"model": name, "category": category, "steps": steps, "fit_s": round(fit, 1), "image_auroc": m["image_auroc"], "pixel_auroc": m["pixel_auroc"]}))
