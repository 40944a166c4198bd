"""The one registry of methods (``methods/registry.py``): every ``conf/method/*.yaml`` names its file, its class
lives in ``methods/<name>.py``, and every method states its name, its selection FLOPs and its config once."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from bench.errors import ConfigError
from methods import registry
from methods.base import PruningMethod

ROOT = Path(__file__).resolve().parent.parent


def test_registry_is_the_config_tree():
    assert registry.names() == sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml"))
    assert {"none", "random", "divprune", "vispruner", "tome", "fastv", "prumerge_plus"} <= set(registry.names())


@pytest.mark.parametrize("name", registry.names())
def test_entry_resolves_and_names_itself(name):
    entry = registry.get(name)
    assert issubclass(entry.cls, PruningMethod)
    m = registry.create(name, 0.0)
    assert m.name == name  # derived from the registry: no class repeats it
    # every method states its own selection FLOPs (0 where it runs no matrix product)
    assert type(m).selection_flops is not PruningMethod.selection_flops, f"{name}: no selection_flops"
    assert entry.summary


def test_unknown_names_get_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown method 'vispruer' \(did you mean 'vispruner'\?\)"):
        registry.get("vispruer")
    with pytest.raises(registry.UnknownMethodError, match="Valid methods: cdpruner, dart"):
        registry.get("zzz")


def test_yaml_name_must_equal_the_file(tmp_path, monkeypatch):
    (tmp_path / "foo.yaml").write_text("# x\nname: bar\n_target_: methods.foo.Foo\n")
    with pytest.raises(ConfigError, match="differs from the file name"):
        registry._read(tmp_path / "foo.yaml")
    (tmp_path / "baz.yaml").write_text("# x\nname: baz\n_target_: methods.random.RandomPruning\n")
    with pytest.raises(ConfigError, match="must live in methods/baz.py"):
        registry._read(tmp_path / "baz.yaml")


def test_methods_hold_no_kernels_and_no_names():
    """``methods/`` is plain torch: no Triton import, no kernel source, no repeated ``name`` property."""
    for path in sorted((ROOT / "methods").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(m.split(".")[0] == "triton" for m in mods), f"{path.name} imports triton"
            if isinstance(node, ast.FunctionDef) and node.name == "name" and path.name != "base.py":
                raise AssertionError(f"{path.name} repeats a name property (the registry names methods)")
        text = path.read_text()
        assert "__global__" not in text and "@triton.jit" not in text, f"{path.name} holds kernel source"


def test_helper_modules_are_not_methods():
    """``methods/<x>_parts.py`` and ``<x>_ports.py`` hold what is not the rule (options, schedules, family ports):
    the registry never lists them, and each sits beside the registered method ``x`` it serves."""
    helpers = sorted(p.stem for p in (ROOT / "methods").glob("*.py") if p.stem.endswith(("_parts", "_ports")))
    assert {"vscan_ports", "sparsevlm_parts", "prumerge_parts"} <= set(helpers)
    for h in helpers:
        assert h not in registry.names(), f"{h} is a helper module, not a method"
        assert h.rpartition("_")[0] in registry.names(), f"{h}: no method {h.rpartition('_')[0]!r} beside it"
