"""Model adapters: all access to transformers internals lives in this package."""

import ast
import functools
from pathlib import Path


@functools.cache
def adapter_targets() -> frozenset[str]:
    """``bench.models.<module>.<Class>`` of every model adapter (a subclass of ``ModelAdapter``) in this
    package: the only values ``model._target_`` may take. Read from the source, nothing is imported."""
    here = Path(__file__).resolve().parent
    classes: dict[str, tuple[str, list[str]]] = {}
    for f in sorted(here.glob("*.py")):
        for node in ast.parse(f.read_text()).body:
            if isinstance(node, ast.ClassDef):
                bases = [b.id if isinstance(b, ast.Name) else b.attr if isinstance(b, ast.Attribute) else "" for b in node.bases]
                classes[node.name] = (f"bench.models.{f.stem}.{node.name}", bases)
    adapters, grew = {"ModelAdapter"}, True
    while grew:
        new = {n for n, (_, bases) in classes.items() if n not in adapters and adapters.intersection(bases)}
        adapters |= new
        grew = bool(new)
    return frozenset(classes[n][0] for n in adapters if n in classes and n != "ModelAdapter")
