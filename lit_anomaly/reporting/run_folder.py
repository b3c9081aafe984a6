"""Run folders: atomic files, report.json, per-image JSONL, aggregation over categories. Knows dicts only."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import __version__
from ..metrics.classification import IMAGE_KEYS, PIXEL_KEYS

SCHEMA_VERSION = 1
HEADLINE_METRICS = IMAGE_KEYS + PIXEL_KEYS


class RunError(ValueError):
    """A run folder or output path that cannot be used; the message names it."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def replace_atomic(temporary: Path, path: Path) -> None:
    """Give a finished temporary file the user's normal permissions, flush it to disk and move it over `path`:
    a kill or a full disk leaves the previous file or none, never half a file."""
    try:
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp creates 0600
        with open(temporary, "rb+") as stream:
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def temporary_beside(path: Path) -> Path:
    """An empty temporary file in `path`'s folder (created if needed), for `replace_atomic`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    return Path(temporary)


def check_output_file(path: str | Path, flag: str, what: str) -> Path:
    """`path` for an output file given by `flag`, refused before any work if it cannot be written there."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise RunError(f"{flag} {path} is a folder; expected a file path for {what}")
    if not path.parent.is_dir():
        raise RunError(f"{flag} {path}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise RunError(f"{flag} {path}: folder {path.parent} is not writable")
    return path


def write_atomic(path: Path, data: str | bytes | Callable[[Path], None]) -> None:
    """Write `data` (or let `data(temporary_path)` write) via a temporary file in the same folder, fsync and
    rename: readers never see half a file."""
    temporary = temporary_beside(path)
    try:
        if callable(data):
            data(temporary)
        else:
            temporary.write_bytes(data.encode() if isinstance(data, str) else data)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    replace_atomic(temporary, path)


def to_json(document: Any) -> str:
    return json.dumps(document, indent=2, allow_nan=False, default=str) + "\n"


def sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "run"


def default_run_dir(parent: Path, dataset: str, model: str, create: bool) -> Path:
    """`<parent>/<YYYYmmdd-HHMMSS>_<dataset>_<model>`, suffixed -2, -3 ... rather than reuse a folder.

    With `create`, the folder is made here, exclusively: two runs started in the same second get two folders."""
    stem = f"{datetime.now().strftime('%Y%m%d-%H%M%S')}_{sanitize(dataset)}_{sanitize(model)}"
    for n in range(1, 10_000):
        candidate = parent / (stem if n == 1 else f"{stem}-{n}")
        if not create:
            if not candidate.exists():
                return candidate
            continue
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            continue
        except OSError as error:
            raise RunError(f"--run.parent_dir {parent}: cannot create a run folder there ({error.strerror})") from error
    raise RunError(f"--run.parent_dir {parent}: too many runs named {stem}")


# Config keys that do not change results: a resumed run may differ in these.
RESUMABLE_DIFFERENCES = (
    "run.", "data.init_args.category", "data.init_args.num_workers", "data.init_args.eval_batch_size",
    "data.init_args.predict_dir", "trainer.devices", "trainer.strategy", "trainer.num_nodes",
    "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.default_root_dir",
)  # fmt: skip


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(config, dict):
        items: dict[str, Any] = {}
        for key, value in config.items():
            items.update(flatten(value, f"{prefix}{key}."))
        return items
    return {prefix.rstrip("."): config}


def config_differences(old: dict, new: dict) -> list[str]:
    """Keys whose values differ between two run configs, ignoring those that do not change results."""
    a, b = flatten(old), flatten(new)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return [k for k in keys if not k.startswith(RESUMABLE_DIFFERENCES)]


def aggregate(per_category: dict[str, dict], keys: Iterable[str] = HEADLINE_METRICS) -> tuple[dict, dict]:
    """Mean and population std of each metric over the categories that finished with a value for it."""
    means, stds = {}, {}
    for key in keys:
        values = [
            r["metrics"][key]
            for r in per_category.values()
            if r.get("status") == "ok" and r["metrics"].get(key) is not None
        ]
        if values:
            mean = sum(values) / len(values)
            means[key] = mean
            stds[key] = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        else:
            means[key] = stds[key] = None
    return means, stds


def _git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def environment(device: str | None = None) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    packages = {}
    for name in ("torch", "torchvision", "pytorch-lightning", "torchmetrics", "timm", "numpy", "jsonargparse"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": packages,
        "device": device,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu_count": os.cpu_count(),
        "git_commit": _git_commit(),
    }


LOCK_NAME = ".lock"


class RunFolder:
    """The files of one run; only the process that owns the run (global rank 0) writes, under a lock."""

    def __init__(self, path: Path, writable: bool = True) -> None:
        self.path = path
        self.writable = writable
        self._lock: Any = None
        self._page: Any = None  # the RunPage of report.html, once there is one

    @classmethod
    def create(cls, output_dir: str | None, parent: str, dataset: str, model: str, writable: bool) -> RunFolder:
        if output_dir is None:
            return cls(default_run_dir(Path(parent).expanduser(), dataset, model, create=writable), writable)
        path = Path(output_dir).expanduser()
        if path.exists() and not path.is_dir():
            raise RunError(f"--run.output_dir {path} is a file; expected a folder (new or empty)")
        if writable and path.is_dir() and any(p.name != LOCK_NAME for p in path.iterdir()):
            raise RunError(
                f"--run.output_dir {path} exists and is not empty; choose a new folder or continue it with "
                f"--run.resume {path}"
            )
        return cls(path, writable)

    @classmethod
    def resume(cls, path: str, dataset: str, model: str, writable: bool) -> RunFolder:
        folder = cls(Path(path).expanduser(), writable)
        if not folder.path.is_dir():
            raise RunError(f"--run.resume {folder.path} does not exist or is not a folder")
        report = folder.read_report()
        if report is None:
            raise RunError(f"--run.resume {folder.path}: no report.json there, so it is not a lit-anomaly run folder")
        if (report.get("dataset"), report.get("model")) != (dataset, model):
            raise RunError(
                f"--run.resume {folder.path} holds a {report.get('dataset')}/{report.get('model')} run, "
                f"not {dataset}/{model}"
            )
        return folder

    def check_resumable(self, config: dict, force: bool) -> dict:
        """The folder's own config, after refusing a `config` that would change results (unless `force`)."""
        stored = (self.read_report() or {}).get("config") or {}
        differences = config_differences(stored, config)
        if differences and not force:
            there, now = flatten(stored), flatten(config)
            shown = ", ".join(f"{k} ({there.get(k)!r} there, {now.get(k)!r} now)" for k in differences[:4])
            raise RunError(
                f"--run.resume {self.path} was run with other settings that change results: {shown}"
                f"{' ...' if len(differences) > 4 else ''}; rerun with its config.yaml, or pass --run.resume_force true"
            )
        return stored if not differences else config

    def open(self, resuming: bool) -> None:
        """Create the folder, check it is writable and lock it for this process; a second process is refused.

        The lock is an flock on `.lock`: the system drops it when the process dies, even by kill -9."""
        if not self.writable:
            return
        import fcntl

        try:
            self.path.mkdir(parents=True, exist_ok=True)
            handle = open(self.path / LOCK_NAME, "a+")  # noqa: SIM115 - held open for the run's lifetime
        except OSError as error:
            raise RunError(f"cannot write the run folder {self.path}: {error.strerror}") from error
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            raise RunError(
                f"run folder {self.path} is in use by another lit-anomaly process (pid {owner}); wait for it to "
                "finish or choose another --run.output_dir"
            ) from error
        if not resuming and (self.path / "report.json").exists():  # another run finished here since we looked
            handle.close()
            raise RunError(f"--run.output_dir {self.path} already holds a run; use --run.resume {self.path}")
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock = handle

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    def category_dir(self, category: str) -> Path:
        return self.path / "categories" / sanitize(category)

    def read_report(self, category: str | None = None) -> dict | None:
        path = (self.category_dir(category) if category else self.path) / "report.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def finished(self, categories: Sequence[str]) -> dict[str, dict]:
        """Category reports already on disk with status ok (what --run.resume skips)."""
        reports = {c: self.read_report(c) for c in categories}
        return {c: r for c, r in reports.items() if r is not None and r.get("status") == "ok"}

    def write_category(self, result: dict, records: list[dict] | None, files: dict[str, bytes] | None = None) -> None:
        """The category's files (`files`: relative name to content), records, then its report.json: a category
        report on disk means the category is complete."""
        if not self.writable:
            return
        directory = self.category_dir(result["category"])
        if result["status"] == "ok":
            (directory / "traceback.txt").unlink(missing_ok=True)  # an earlier failure, retried by --run.resume
        for name, content in (files or {}).items():
            write_atomic(directory / name, content)
        if records is not None:
            write_atomic(directory / "per_image.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        write_atomic(directory / "report.json", to_json(result))

    def write_report(self, report: dict, config_yaml: str | None, copy_to: str | None, html: bool = False) -> None:
        if not self.writable:
            return
        write_atomic(self.path / "report.json", to_json(report))
        if html:
            from .html import RunPage  # matplotlib loads only for runs that write the page

            self._page = self._page or RunPage(self.path)
            write_atomic(self.path / "report.html", self._page.render(report))
        if config_yaml is not None:
            write_atomic(self.path / "config.yaml", config_yaml)
        if copy_to:
            try:
                write_atomic(Path(copy_to), to_json(report))
            except OSError as error:  # checked before the run, yet a disk fills or a mount goes away
                raise RunError(
                    f"--run.output {copy_to}: cannot write the report copy ({error.strerror or error}); the run's "
                    f"results are in {self.path}"
                ) from error


def build_report(
    dataset: str,
    model: str,
    categories: Sequence[str],
    per_category: dict[str, dict],
    run_dir: Path | None,
    config: dict,
    env: dict,
    wall_s: float | None = None,
) -> dict[str, Any]:
    means, stds = aggregate(per_category)
    return {
        "schema_version": SCHEMA_VERSION,
        "lit_anomaly_version": __version__,
        "timestamp_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "dataset": dataset,
        "model": model,
        "categories": list(categories),
        "per_category": per_category,
        "mean_metrics": means,
        "std_metrics": stds,
        "run_dir": str(run_dir) if run_dir else None,
        "wall_s": wall_s,
        "config": config,
        "environment": env,
    }
