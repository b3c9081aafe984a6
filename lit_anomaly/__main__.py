"""`python -m lit_anomaly` and the `lit-anomaly` command."""

import atexit
import gc
import os
import sys


def run() -> int:
    """Import the CLI and run it, with two settings that belong to the process, not to the library
    (`lit_anomaly.cli.main` leaves both alone):

    - Importing torch, Lightning and torchmetrics creates some 740k objects that live until exit: collecting
      while they are created costs about 1 s, and the interpreter's full collection at exit traced them all
      again (1.3 s). Frozen, the collector skips them.
    - Freed blocks stay in the heap (`keep_freed_memory`): a backbone's activations are no longer faulted in
      afresh at every forward pass.
    """
    gc.disable()
    from .utils.process import keep_freed_memory

    keep_freed_memory()
    from .cli import main

    gc.freeze()
    gc.enable()
    return main()


def command() -> None:
    """The `lit-anomaly` command: `run`, then exit without the interpreter's teardown, which frees one by one the
    objects torch, Lightning and matplotlib created (0.6 s), memory the kernel takes back at once. By then the
    run's files are closed and synced; exit handlers (logging, multiprocessing) still run, and stdout and
    stderr are flushed."""
    code = run()
    atexit._run_exitfuncs()  # what interpreter shutdown would run first
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    command()
