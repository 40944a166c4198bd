"""Which method runs on which model family: asked of each family's adapter (``check_method``), never listed by hand.

``python -m bench list families`` prints :func:`markdown_table`; the README carries the same table between
``<!-- families:begin -->`` and ``<!-- families:end -->`` (``tests/test_families.py`` checks they are equal).
"""

from __future__ import annotations

from pathlib import Path

import yaml

CONF = Path(__file__).resolve().parent.parent / "conf" / "model"
#: the reference checkpoint of each family (architecture from its committed config: no weights needed),
#: and the model settings the table varies (LLaVA-NeXT's budget convention)
FAMILIES: dict[str, tuple[str, list[dict]]] = {
    "LLaVA-1.5": ("llava15_7b", [{}]),
    "LLaVA-NeXT": ("llava_next_7b", [{"budget": "image"}, {"budget": "tile"}, {"budget": "base_grid"}]),
    "Qwen2.5-VL": ("qwen25vl_7b", [{}]),
}
#: the ratio the check uses (in-LLM schedules are checked for reachability at a ratio: a mid-range one)
RATIO = 0.75
BEGIN, END = "<!-- families:begin -->", "<!-- families:end -->"


def adapter_for(model: str, **overrides):
    """The (unloaded) adapter of ``conf/model/<model>.yaml``; its config comes from the committed architecture JSON."""
    from hydra.utils import get_class

    cfg = yaml.safe_load((CONF / f"{model}.yaml").read_text())
    cfg.update(device="cpu", weights="random", **overrides)
    return get_class(cfg.pop("_target_"))(**cfg)


def support(method_names: list[str] | None = None) -> dict[str, dict[str, str]]:
    """``{method: {family: cell}}``: ``"yes"``, ``"budget=tile"`` (only under that setting) or ``"no: <reason>"``."""
    from bench.errors import BenchError
    from methods import registry

    out: dict[str, dict[str, str]] = {}
    adapters = {fam: [(ov, adapter_for(model, **ov)) for ov in variants] for fam, (model, variants) in FAMILIES.items()}
    for name in method_names or registry.names():
        row = {}
        for fam, variants in adapters.items():
            ok, reasons = [], []
            for ov, adapter in variants:
                try:
                    adapter.check_method(registry.create(name, 0.0 if name == "none" else RATIO))
                    ok.append(ov)
                except BenchError as e:
                    msg = str(e).strip()
                    reasons.append(msg.removeprefix(f"method {name!r} ").removeprefix(f"{name}: "))
            if len(ok) == len(variants):
                row[fam] = "yes"
            elif ok:
                row[fam] = ", ".join(f"{k}={v}" for ov in ok for k, v in ov.items())
            else:
                row[fam] = "no: " + reasons[0]
        out[name] = row
    return out


def markdown_table(method_names: list[str] | None = None) -> str:
    """The method x family table in Markdown (one row per registered method)."""
    table = support(method_names)
    fams = list(FAMILIES)
    lines = ["| method | " + " | ".join(fams) + " |", "|---|" + "---|" * len(fams)]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(row[f].replace("|", "/") for f in fams) + " |")
    return "\n".join(lines)


def readme_table(readme: str) -> str:
    """The table between the markers in README text."""
    if BEGIN not in readme or END not in readme:
        raise ValueError(f"README has no {BEGIN} ... {END} block")
    return readme.split(BEGIN, 1)[1].split(END, 1)[0].strip()
