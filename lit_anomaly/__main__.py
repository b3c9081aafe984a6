"""`python -m lit_anomaly` and the `lit-anomaly` command."""

import gc
import sys


def run() -> int:
    """Import the CLI and run it. Importing torch, Lightning and torchmetrics creates some 740k objects that live
    until exit: collecting while they are created costs about 1 s, and the interpreter's full collection at exit
    traced them all again (1.3 s). Frozen, the collector skips them; this process owns its collector, the
    library (`lit_anomaly.cli.main`) leaves it alone."""
    gc.disable()
    from .cli import main

    gc.freeze()
    gc.enable()
    return main()


if __name__ == "__main__":
    sys.exit(run())
