"""Pruning methods: one module per method, each the method's rule in plain torch.

A method is ``methods/<name>.py`` + ``conf/method/<name>.yaml``; :mod:`methods.registry` finds it from the
YAML. Fast paths (Triton, CUDA) of a rule live in :mod:`kernels`, behind :func:`kernels.fast_path`. What is not
the rule sits beside it in plain torch: ``<name>_ports.py`` (a model family's port of the official code) and
``<name>_parts.py`` (option helpers, budget schedules, plumbing); without a YAML the registry never lists them.
"""

from methods.base import PruningMethod, VisionContext, VisualSelection

__all__ = ["PruningMethod", "VisionContext", "VisualSelection"]
