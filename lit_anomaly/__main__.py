"""`python -m lit_anomaly` and the `lit-anomaly` command."""

import gc
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
    from .data.base import keep_freed_memory

    keep_freed_memory()
    from .cli import main

    gc.freeze()
    gc.enable()
    return main()


if __name__ == "__main__":
    sys.exit(run())
