"""Settings of the process and its loader workers, stopping on signals, and Lightning's quiet mode."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator

from pytorch_lightning.utilities.exceptions import SIGTERMException

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory(worker_id: int = 0) -> None:
    """Keep freed blocks under 256 MB in this process's heap; fit to be a DataLoader `worker_init_fn`.

    glibc hands such blocks back to the kernel when they are freed and faults their pages in again at the next
    allocation: a decoded large image's buffers and every activation of a backbone's forward pass would be
    page-faulted afresh each time."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")  # absent on musl, which has no such thresholds
    except OSError:
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 256 << 20)  # setting either also stops glibc's own adjustment of both
    libc.mallopt(_M_TRIM_THRESHOLD, 512 << 20)


LOADER_WORKER_NICENESS = 10


def init_loader_worker(worker_id: int = 0) -> None:
    """A DataLoader worker's settings: freed buffers stay in its heap (`keep_freed_memory`), SIGTERM ends it as
    by default, and it decodes at a lower CPU priority (nice +10) than the process that runs the model.

    Where the threads that want a core outnumber the cores, a preempted intra-op thread stalls its partner in
    every parallel kernel; ranked lower, the workers take the time the model leaves instead. Idle cores still
    go to the workers."""
    keep_freed_memory()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the loop's handler (stopping_on_signals) is for the main process
    if hasattr(os, "nice"):  # POSIX; raising one's own niceness needs no privilege
        os.nice(LOADER_WORKER_NICENESS)


@contextlib.contextmanager
def stopping_on_signals() -> Iterator[list[int]]:
    """SIGINT and SIGTERM (a scheduler's stop) end the block as KeyboardInterrupt and Lightning's
    SIGTERMException, and the signal is remembered (the yielded list).

    Remembered, because C extensions turn an exception raised while they run into their own (matplotlib's
    drawing reports Ctrl+C as a TypeError), which must neither pass for a failed category nor end the command
    as a fault. Only the main thread can take signals; elsewhere this changes nothing."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def stop(signum: int, frame: object) -> None:
        received.append(signum)
        raise KeyboardInterrupt if signum == signal.SIGINT else SIGTERMException

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    except BaseException as error:
        if received and not isinstance(error, KeyboardInterrupt | SIGTERMException):
            raise (KeyboardInterrupt() if received[0] == signal.SIGINT else SIGTERMException()) from error
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


QUIET = (  # Lightning advice that does not apply to one-pass, optimiser-free detectors
    r".*does not have many workers.*",
    r".*configure_optimizers.*",
    r".*sync_dist.*",
    r".*The number of training batches.*",
    r".*Total length of .* across ranks is zero.*",
    r".*Using `DistributedSampler` with the dataloaders.*",
    r".*module\(s\) in eval mode.*",
    r".*treespec.*",
    r".*all_gather is deprecated.*",
)


class WithoutTips(logging.Filter):
    """Drops Lightning's "💡 Tip" lines, adverts for its cloud services printed by every Trainer: noise around
    our own warnings, and links an air-gapped line PC cannot follow."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's advice that does not apply here (QUIET) and its tips, left out within the block."""
    tips = WithoutTips()
    loggers = [
        logging.getLogger(f"{package}.utilities.rank_zero") for package in ("pytorch_lightning", "lightning_fabric")
    ]
    with warnings.catch_warnings():
        for pattern in QUIET:
            warnings.filterwarnings("ignore", message=pattern)
        for logger in loggers:
            logger.addFilter(tips)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(tips)
