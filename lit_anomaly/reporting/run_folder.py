"""Run folders: creating, locking and resuming one, and writing its reports and per-image JSONL. Knows dicts only."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from ..runtime.files import RunError, sanitize, to_json, write_atomic


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


# Config keys that do not change results: a resumed run may differ in these (but for RESULT_CHANGING_RUN_KEYS).
RESUMABLE_DIFFERENCES = (
    "run.", "data.init_args.category", "data.init_args.num_workers", "data.init_args.eval_batch_size",
    "data.init_args.predict_dir", "trainer.devices", "trainer.strategy", "trainer.num_nodes",
    "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.default_root_dir",
)  # fmt: skip
RESULT_CHANGING_RUN_KEYS = ("run.unified",)


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
    return [k for k in keys if k in RESULT_CHANGING_RUN_KEYS or not k.startswith(RESUMABLE_DIFFERENCES)]


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
