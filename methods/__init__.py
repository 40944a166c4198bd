"""Pruning methods. One module per method; each is registered by its ``conf/method/<name>.yaml``."""

from methods.base import PruningMethod, VisionContext, VisualSelection

__all__ = ["PruningMethod", "VisionContext", "VisualSelection"]
