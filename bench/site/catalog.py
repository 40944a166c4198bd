"""What the site says about each method: read from ``conf/method/<name>.yaml`` and the method's code.

:func:`method_catalog` is the one place that enumerates methods for the site; it reads the config
directory directly (``conf/method/*.yaml``: name, ``_target_``, defaults, the comment on its first
line) and the target class (stage, dataclass defaults, module docstring with the paper and
official-code links).
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONF_METHOD = Path(__file__).resolve().parent.parent.parent / "conf" / "method"
_ARXIV = re.compile(r"https?://arxiv\.org/abs/[0-9.]+(?:v\d+)?")
# "code: owner/repo" or "Official code: ``owner/repo``"
_CODE = re.compile(r"code:\s*(?:``)?([A-Za-z0-9][\w.-]*/[\w.-]*\w)", re.IGNORECASE)


@dataclass
class MethodInfo:
    name: str
    target: str
    stage: str
    summary: str  # the config's first comment line, else the docstring's first sentence
    doc: str  # module docstring
    paper: str | None
    code: str | None  # https://github.com/<owner>/<repo>
    config_text: str
    defaults: dict[str, Any] = field(default_factory=dict)  # dataclass fields and their defaults


def _summary(config_text: str, doc: str) -> str:
    first = config_text.splitlines()[0] if config_text else ""
    if first.startswith("#"):
        return first.lstrip("# ").strip()
    return doc.strip().split("\n\n")[0].replace("\n", " ")


def _stage(name: str, cls: type) -> str:
    """Where the method prunes with its shipped settings on LLaVA-1.5. A method whose stage depends on its port
    (FlowCut: in the tower on LLaVA-1.5, tower + LLM on its Qwen/NeXT ports) has it as a property, which only an
    instance answers; the class attribute would print as ``<property object at 0x...>``."""
    stage = getattr(cls, "stage", "pre_llm")
    if isinstance(stage, property):
        from methods.registry import create

        stage = create(name, 0.5).stage
    return str(stage)


def method_info(path: Path) -> MethodInfo:
    text = path.read_text()
    cfg = yaml.safe_load(text) or {}
    target = cfg.get("_target_", "")
    mod_name, _, cls_name = target.rpartition(".")
    cls = getattr(importlib.import_module(mod_name), cls_name)
    doc = (importlib.import_module(mod_name).__doc__ or "") + "\n" + (cls.__doc__ or "")
    paper = _ARXIV.search(doc)
    code = _CODE.search(doc)
    defaults = {}
    if dataclasses.is_dataclass(cls):
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                defaults[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                defaults[f.name] = f.default_factory()  # type: ignore[misc]
    return MethodInfo(
        name=cfg.get("name", path.stem), target=target, stage=_stage(cfg.get("name", path.stem), cls),
        summary=_summary(text, doc), doc=(importlib.import_module(mod_name).__doc__ or "").strip(),
        paper=paper.group(0) if paper else None, code=f"https://github.com/{code.group(1)}" if code else None,
        config_text=text, defaults=defaults,
    )


def method_catalog(conf_dir: Path = CONF_METHOD) -> dict[str, MethodInfo]:
    """``name -> MethodInfo`` for every ``conf/method/*.yaml``, sorted by name."""
    out = {}
    for p in sorted(Path(conf_dir).glob("*.yaml")):
        info = method_info(p)
        out[info.name] = info
    return out
