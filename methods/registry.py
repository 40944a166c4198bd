"""The one registry of methods: ``conf/method/<name>.yaml`` + the class it names, nothing else.

A method is named once, by its YAML file name. The file's ``_target_`` is ``methods.<name>.<Class>``
(a variant ``<base>_<variant>.yaml`` may name a class of ``methods/<base>.py``, as ``prumerge_plus``
does); its ``name:`` key, kept because run ids hash the resolved config, must equal the file name.
``python -m bench list``, the CLI's validation, the tests and the FLOPs model all read this registry,
so adding ``methods/x.py`` and ``conf/method/x.yaml`` is all it takes for ``x`` to appear everywhere.
Classes are imported on first use only (``python -m bench list`` imports no method).
"""

from __future__ import annotations

import difflib
import functools
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf" / "method"
METHODS_DIR = Path(__file__).resolve().parent


class UnknownMethodError(ConfigError):
    """A method name the registry does not hold (the message lists the valid ones and the nearest)."""


@dataclass(frozen=True)
class MethodEntry:
    """One registered method.

    Attributes
    ----------
    name : str
        The YAML file's stem: the method's one name (CLI, records, leaderboards).
    config : Path
        ``conf/method/<name>.yaml``.
    target : str
        ``methods.<module>.<Class>``, the YAML's ``_target_``.
    summary : str
        The YAML's first comment line (``python -m bench list``).
    """

    name: str
    config: Path
    target: str
    summary: str

    @property
    def cls(self) -> type:
        """The method's class (imported on first use)."""
        module, _, cls = self.target.rpartition(".")
        return getattr(importlib.import_module(module), cls)

    def defaults(self) -> dict[str, Any]:
        """The YAML's method settings (not ``name``/``_target_``, nor the run-level ``${ratio}``/``${seed}``)."""
        from omegaconf import OmegaConf

        raw = OmegaConf.to_container(OmegaConf.load(self.config), resolve=False)
        return {k: v for k, v in raw.items() if k not in ("name", "_target_") and not (isinstance(v, str) and v.startswith("${"))}


def _read(path: Path) -> MethodEntry:
    name, target, summary, yaml_name = path.stem, None, "", None
    for line in path.read_text().splitlines():
        if line.startswith("#") and not summary and not line.startswith("# @package"):
            summary = line.lstrip("# ").strip()
        key, _, value = line.partition(":")
        if key == "_target_":
            target = value.split("#")[0].strip()
        elif key == "name":
            yaml_name = value.split("#")[0].strip().strip("'\"")
    if yaml_name is not None and yaml_name != name:
        raise ConfigError(f"{path}: name: {yaml_name!r} differs from the file name {name!r} (a method is named by its file)")
    parts = (target or "").split(".")
    if len(parts) != 3 or parts[0] != "methods":
        raise ConfigError(f"{path}: _target_ must be methods.<module>.<Class>, got {target!r}")
    module = parts[1]
    if not (module == name or name.startswith(module + "_")):
        raise ConfigError(f"{path}: _target_ {target!r} must live in methods/{name}.py (or a variant's base module)")
    if not (METHODS_DIR / f"{module}.py").is_file():
        raise ConfigError(f"{path}: methods/{module}.py does not exist")
    return MethodEntry(name, path, target, summary)


@functools.cache
def entries() -> dict[str, MethodEntry]:
    """Every registered method by name, sorted."""
    return {p.stem: _read(p) for p in sorted(CONF_DIR.glob("*.yaml"))}


def names() -> list[str]:
    return list(entries())


def suggest(name: str, valid: list[str]) -> str:
    """`` (did you mean 'x'?)`` for a near miss, else ``""``."""
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def get(name: str) -> MethodEntry:
    """The entry of ``name``; :class:`UnknownMethodError` (exit code 2) with the valid names otherwise."""
    try:
        return entries()[name]
    except KeyError:
        raise UnknownMethodError(f"unknown method {name!r}{suggest(name, names())}. Valid methods: {', '.join(names())}") from None


def create(name: str, prune_ratio: float = 0.0, seed: int = 0, **overrides: Any):
    """An instance of ``name`` with its YAML's settings, ``prune_ratio``, ``seed`` and ``overrides``."""
    entry = get(name)
    return entry.cls(prune_ratio=prune_ratio, seed=seed, **{**entry.defaults(), **overrides})


@functools.cache
def _names_by_target() -> dict[str, str]:
    return {e.target: e.name for e in entries().values()}


def targets() -> frozenset[str]:
    """Every registered method class as ``methods.<module>.<Class>``: the only values ``method._target_`` may take."""
    return frozenset(_names_by_target())


def name_of(cls: type) -> str:
    """The registered name of a method class (for a class not in the registry: its module's name)."""
    return _names_by_target().get(f"{cls.__module__}.{cls.__qualname__}", cls.__module__.rpartition(".")[2])
