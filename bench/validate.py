"""Checks of a run's inputs that need no model: they run before any model work, so bad input exits with
code 2 and a one-paragraph message, and nothing is written (issue 28)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.errors import BenchError, ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def allowed_targets(group: str) -> frozenset[str]:
    """Classes a ``<group>._target_`` may name: registered methods, or model adapters in ``bench/models``."""
    if group == "method":
        from methods.registry import targets

        return targets()
    if group == "model":
        from bench.models import adapter_targets

        return adapter_targets()
    return frozenset()


def check_target(key: str, value: Any) -> None:
    """Refuse a ``_target_`` outside the registry: it would call an arbitrary importable callable.

    ``key`` is the dotted config key (``method._target_``); raises :class:`ConfigError` (exit code 2).
    """
    group = key.rsplit(".", 1)[0] if "." in key else ""
    allowed = allowed_targets(group)
    if value in allowed:
        return
    from methods.registry import suggest

    what = {"method": "registered method classes (methods/registry.py)", "model": "model adapters in bench/models/"}.get(group)
    if what is None:
        raise ConfigError(f"{key}={value!r}: _target_ can only be set for method and model (to a registered class); "
                          f"it would otherwise call an arbitrary function")
    raise ConfigError(f"{key}={value!r} is not one of the {what}{suggest(str(value), sorted(allowed))}: _target_ only "
                      f"selects among them (choose a method with method=<name>, a model with model=<name>). "
                      f"Allowed: {', '.join(sorted(allowed))}")


def check_targets(cfg: dict[str, Any]) -> None:
    """:func:`check_target` for every ``_target_`` in a composed config (method, model, and anywhere else)."""

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                p = f"{path}.{k}" if path else str(k)
                if k == "_target_":
                    check_target(p, v)
                else:
                    walk(v, p)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    walk({k: v for k, v in cfg.items() if k != "hydra"}, "")


# ----------------------------------------------------------------------------- overrides
#: ``+key`` is refused (it would add a key nothing reads) except at these documented extension points:
#: ``+sweep=<preset>`` (conf/sweep/), ``+slurm.<key>`` (conf/hydra/launcher/slurm.yaml), ``+local.<key>``
#: (site settings, never part of a run's identity) and Hydra's own ``hydra.*``.
EXTENSION_PREFIXES = ("local.", "hydra.")


def slurm_keys() -> list[str]:
    """The ``slurm.<key>`` settings ``conf/hydra/launcher/slurm.yaml`` reads."""
    import re

    text = (CONF_DIR / "hydra" / "launcher" / "slurm.yaml").read_text()
    return sorted(set(re.findall(r"oc\.select:slurm\.(\w+)", text)))


def check_slurm() -> None:
    """``hydra/launcher=slurm`` needs a reachable Slurm controller (``sinfo`` answers), not just its commands."""
    import shutil
    import subprocess

    if shutil.which("sbatch") is None:
        raise ConfigError("hydra/launcher=slurm: no Slurm client here (sbatch is not on PATH); run on a cluster login node, "
                          "or leave out hydra/launcher to run the sweep locally")
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=20)
        ok = r.returncode == 0
        why = (r.stderr or r.stdout).strip().splitlines()[-1:] if not ok else []
    except (OSError, subprocess.TimeoutExpired) as e:
        ok, why = False, [str(e)]
    if not ok:
        raise ConfigError(f"hydra/launcher=slurm: the Slurm controller does not answer ({' '.join(why) or 'sinfo failed'}); "
                          f"run where the cluster is reachable, or leave out hydra/launcher to run the sweep locally")


def check_append(key: str, known: list[str]) -> None:
    """Refuse ``+key`` outside the extension points; ``known`` (dotted keys of the config) feeds did-you-mean."""
    from methods.registry import suggest

    if key == "sweep" or key.startswith(EXTENSION_PREFIXES):
        return
    if key.startswith("slurm."):
        valid = slurm_keys()
        if key.split(".", 1)[1] in valid:
            return
        raise ConfigError(f"+{key}: not a Slurm setting{suggest(key.split('.', 1)[1], valid)}. Valid: {', '.join('slurm.' + k for k in valid)}")
    if key in known:
        raise ConfigError(f"+{key}: {key} already exists; set it with {key}=<value> (no '+')")
    raise ConfigError(
        f"+{key}: adds a key that nothing reads{suggest(key, known)}, and it would still change the run id. '+' is for "
        f"the extension points only: +sweep=<preset>, +slurm.<setting>, +local.<key>. Every setting the harness reads "
        f"already exists: `python -m bench run --cfg job` lists them."
    )


def flat_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted keys of a nested dict (every level)."""
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            p = f"{prefix}.{k}" if prefix else str(k)
            out.append(p)
            out.extend(flat_keys(v, p))
    return out


# ----------------------------------------------------------------------------- a composed run config
_ATTN = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_method_settings(mcfg: dict[str, Any]) -> None:
    """Each method setting has the type of the method's shipped default (``method.r=abc`` exits 2)."""
    from methods import registry

    entry = registry.get(mcfg["name"])
    defaults = entry.defaults()
    import dataclasses

    cls = entry.cls
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else None
    import typing

    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an annotation that does not evaluate: leave the type check to the method
        hints = {}
    for k, v in mcfg.items():
        if k in ("name", "_target_", "description", "prune_ratio", "seed"):
            continue
        if fields is not None and k not in fields:
            raise ConfigError(f"method.{k}: {mcfg['name']} has no setting {k!r}{registry.suggest(k, sorted(fields))}. Its settings: {', '.join(sorted(fields - {'prune_ratio', 'seed'}))}")
        hint = hints.get(k)
        if hint is not None and not _matches(v, hint):
            raise ConfigError(f"method.{k}={v!r}: {mcfg['name']} expects {_hint_name(hint)} here (default {defaults.get(k)!r})")


def _matches(v: Any, hint: Any) -> bool:
    """Whether a config value fits a dataclass field's annotation (ints fit floats; bools fit only bools)."""
    import types
    import typing

    origin = typing.get_origin(hint)
    if hint is typing.Any or isinstance(hint, typing.TypeVar):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(v, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return v in typing.get_args(hint)
    if origin in (list, tuple, typing.Sequence):
        args = typing.get_args(hint)
        return isinstance(v, (list, tuple)) and (not args or all(_matches(x, args[0]) for x in v))
    if hint is type(None):
        return v is None
    if hint is bool:
        return isinstance(v, bool)
    if hint is int:
        return _int(v)
    if hint is float:
        return _num(v)
    if hint is str:
        return isinstance(v, str)
    return True  # a type the config cannot express: the method checks it


def _hint_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def check_results_dir(path: Any) -> None:
    """``results_dir`` is a directory (or can be created as one) that this user can write, with legal names."""
    import os
    from pathlib import Path

    p = Path(str(path)).expanduser()
    for part in p.parts:
        if len(part.encode()) > 255:
            raise ConfigError(f"results_dir: the name {part[:40]!r}... is {len(part.encode())} bytes, longer than a file name may be (255)")
    if p.exists() and not p.is_dir():
        raise ConfigError(f"results_dir={p} is a file, not a directory; choose a directory (it is created if missing)")
    q = p
    while not q.exists():
        if q.parent == q:
            break
        q = q.parent
    if q.exists() and not q.is_dir():
        raise ConfigError(f"results_dir={p}: {q} is a file, so no directory can be created under it")
    if q.exists() and not os.access(q, os.W_OK | os.X_OK):
        raise ConfigError(f"results_dir={p}: {q} is not writable by this user; choose another results_dir")


def check_config(cfg: dict[str, Any]) -> None:
    """Every check of a resolved run config that needs no model and no data: raises :class:`ConfigError`."""
    check_targets(cfg)
    if not _int(cfg.get("seed")):
        raise ConfigError(f"seed must be an integer, got {cfg.get('seed')!r}")
    for k in ("overwrite", "verify"):
        if not isinstance(cfg.get(k), bool):
            raise ConfigError(f"{k} must be true or false, got {cfg.get(k)!r}")
    dev = str(cfg.get("device"))
    import re

    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", dev):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:<index>, got {dev!r}")
    check_results_dir(cfg.get("results_dir"))
    m = cfg["model"]
    attn = m.get("attn_implementation")
    if attn not in _ATTN:
        raise ConfigError(f"model.attn_implementation must be one of {', '.join(_ATTN)}, got {attn!r}")
    if attn in ("flash_attention_2", "flash_attention_3"):
        import importlib.util

        pkg = "flash_attn" if attn == "flash_attention_2" else "flash_attn_interface"
        if importlib.util.find_spec(pkg) is None:
            raise ConfigError(f"model.attn_implementation={attn} needs the {pkg} package, which is not installed; use sdpa (the default) or eager")
    for k in ("download", "allow_pickle_weights"):
        if k in m and not isinstance(m[k], bool):
            raise ConfigError(f"model.{k} must be true or false, got {m[k]!r}")
    if not isinstance(m.get("sha256") or {}, dict):
        raise ConfigError(f"model.sha256 must be a mapping {{file name: sha256}}, got {m.get('sha256')!r}")
    check_method_settings(cfg["method"])
    b = cfg["benchmark"]
    if b.get("limit") is not None and not (_int(b["limit"]) and b["limit"] >= 1):
        raise ConfigError(f"benchmark.limit must be a positive integer or null, got {b['limit']!r}")
    if not (b.get("batch_size") == "auto" or (_int(b.get("batch_size")) and b["batch_size"] >= 1)):
        raise ConfigError(f"benchmark.batch_size must be a positive integer or auto, got {b.get('batch_size')!r}")
    ms = cfg.get("measure") or {}
    for k, lo in (("repeats", 1), ("warmup", 0), ("batch_size", 1)):
        if k in ms and not (_int(ms[k]) and ms[k] >= lo):
            raise ConfigError(f"measure.{k} must be an integer >= {lo}, got {ms[k]!r} (checked before the accuracy pass, so no work is lost)")
    for k in ("accuracy", "efficiency", "stages"):
        if k in ms and not isinstance(ms[k], bool):
            raise ConfigError(f"measure.{k} must be true or false, got {ms[k]!r}")


# ----------------------------------------------------------------------------- the whole command line
#: keys whose values are paths: quoted for Hydra when they hold spaces or other characters its grammar
#: does not take unquoted (a path with a space or non-ASCII letters is not a syntax error)
PATH_KEYS = ("results_dir", "model.source", "model.config_file", "benchmark.dataset_path", "benchmark.image_dataset_path", "logger.dir")


def quote_paths(args: list[str]) -> list[str]:
    """``results_dir=/data/my results`` -> ``results_dir='/data/my results'`` (Hydra's quoting)."""
    import re

    out = []
    for a in args:
        key, sep, value = a.partition("=")
        if sep and key.lstrip("+~") in PATH_KEYS and value and value[0] not in "'\"$" and not re.fullmatch(r"[\w/.:~@+-]*", value, re.ASCII):
            value = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
        out.append(f"{key}{sep}{value}")
    return out


def _composition_error(e: Exception, known: list[str]) -> ConfigError:
    import re

    from methods.registry import suggest

    msg = str(e)
    m = re.search(r"Could not override '([^']+)'", msg) or re.search(r"Key '([^']+)' is not in struct", msg)
    if m:
        key = m.group(1)
        return ConfigError(f"unknown key {key!r}{suggest(key, known)}: nothing reads it. `python -m bench run --cfg job` lists every setting"
                           f" (a '+' would only add a key that nothing reads)")
    m = re.search(r"Could not append to config. An item is already at '([^']+)'", msg)
    if m:
        return ConfigError(f"+{m.group(1)}: {m.group(1)} already exists; set it with {m.group(1)}=<value> (no '+')")
    first = " ".join(line.strip() for line in msg.splitlines() if line.strip())[:600]
    return ConfigError(f"cannot read the overrides: {first}. Quote values with spaces or special characters: key='a value'")


def preflight(args: list[str]) -> list[dict[str, Any]]:
    """Compose every run of the command line and check it before any of them starts; returns the configs.

    Unknown keys (with did-you-mean), ``+key`` outside the extension points, ``_target_`` outside the
    registry, types and ranges (:func:`check_config`), the launcher, and the data's availability
    (``bench.task_data.resolve``) are checked for every job of a sweep. Raises :class:`ConfigError`.
    """
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    args = [a for a in args if "=" in a and not a.startswith("-")]  # overrides; Hydra's flags (--cfg job) are its own
    groups = ("model", "method", "benchmark", "measure", "logger")
    chosen = [f"{k}={v.split(',')[0]}" for k, _, v in (a.partition("=") for a in args) if k in groups and v and "(" not in v]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        known = flat_keys(OmegaConf.to_container(compose("config", overrides=chosen), resolve=False))
    for a in args:
        key, sep, _ = a.partition("=")
        if sep and key.startswith("+"):
            check_append(key.lstrip("+"), known)
    if any(a.replace(" ", "") == "hydra/launcher=slurm" for a in args):
        check_slurm()
    from bench.sweep import expand

    try:
        cfgs = expand(args)
    except BenchError:
        raise
    except Exception as e:  # noqa: BLE001 - Hydra's composition and parser errors, as exit-2 messages
        raise _composition_error(e, known) from None
    from bench import task_data

    seen: set[str] = set()
    for cfg in cfgs:
        check_config(cfg)
        import json

        bkey = json.dumps(cfg["benchmark"], sort_keys=True, default=str)
        if bkey not in seen:
            seen.add(bkey)
            task_data.resolve(cfg["benchmark"])
    return cfgs
