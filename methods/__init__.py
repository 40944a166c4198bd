"""Pruning methods: one module per method, each the method's rule in plain torch.

A method is ``methods/<name>.py`` + ``conf/method/<name>.yaml``; :mod:`methods.registry` finds it from the
YAML. Fast paths (Triton, CUDA) of a rule live in :mod:`kernels`, behind :func:`kernels.fast_path`.
"""

from methods.base import PruningMethod, VisionContext, VisualSelection

__all__ = ["PruningMethod", "VisionContext", "VisualSelection"]
