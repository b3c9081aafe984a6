"""Whether a model is being traced into a graph for export."""

from __future__ import annotations

import torch


def exporting() -> bool:
    """True while torch traces a model into an ONNX graph: the code paths that loop, tile or pad to make results
    independent of batching take one whole-batch pass instead (the graph's runtime picks kernels of its own)."""
    return torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()
