"""Run identity, run directories and atomic record files."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import yaml

from bench.redaction import redact

#: Top-level config keys that do not change a run's result, so not its identity.
EXCLUDED_KEYS = ("results_dir", "overwrite", "verify", "logger", "hydra", "launcher", "local", "slurm", "paths", "wandb")
#: Keys inside a group that are checks or permissions, not identity: the weights' content fingerprint
#: already identifies what ran (``model.sha256`` pins are verified against it; ``allow_pickle_weights`` only
#: permits a format, and the record's provenance says which one loaded).
#: ``model.text_tower`` (CLIP's text side) is read only by question-conditioned methods (CDPruner); their runs carry
#: its content fingerprint instead (``bench.build.build_run``), so adding it to a model changed no other run's id.
EXCLUDED_NESTED = {"model": ("sha256", "allow_pickle_weights", "text_tower")}


def canonicalize(config: dict[str, Any]) -> dict[str, Any]:
    """Make equal settings hash equally: ``ratio=0`` (an int on the command line) is ``0.0``."""
    for node in (config, config.get("method") or {}):
        for key in ("ratio", "prune_ratio"):
            v = node.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                node[key] = float(v)
    return config


def identity(config: dict[str, Any], fingerprints: dict[str, str]) -> dict[str, Any]:
    """What defines a run: the resolved config minus runtime-only keys, plus content fingerprints."""
    ident = {k: v for k, v in config.items() if k not in EXCLUDED_KEYS}
    for group, keys in EXCLUDED_NESTED.items():
        if isinstance(ident.get(group), dict):
            ident[group] = {k: v for k, v in ident[group].items() if k not in keys}
    ident["_fingerprints"] = dict(sorted(fingerprints.items()))
    return ident


def run_id(config: dict[str, Any], fingerprints: dict[str, str]) -> str:
    """``sha1`` of the sorted JSON of :func:`identity`, cut to 10 hex characters (dora-style)."""
    blob = json.dumps(identity(config, fingerprints), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def run_dir(results_dir: str | Path, rid: str) -> Path:
    return Path(results_dir) / "runs" / rid


def _umask() -> int:
    # os.umask can only be read by setting it; set it back at once (a process-wide value, read once)
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return _UMASK


_UMASK: int | None = None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and ``os.replace``.

    A crash leaves either the old file or the new one, never a half-written file. Errors raise. The
    file gets the permissions a plain ``open(path, "w")`` would give (``0o666 & ~umask``), not
    ``mkstemp``'s private ``0o600``.
    """
    path = Path(path)
    for attempt in range(3):  # a concurrent cleanup may remove an empty parent between mkdir and mkstemp
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            break
        except FileNotFoundError:
            if attempt == 2:
                raise
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), 0o666 & ~_umask())
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def is_temp_file(path: Path) -> bool:
    """Whether ``path`` is an in-flight temporary file of :func:`atomic_write_bytes` (``.<name>.<random>.tmp``)."""
    name = Path(path).name
    return name.startswith(".") and name.endswith(".tmp")


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON, with secret-looking keys redacted (:func:`bench.redaction.redact`)."""
    atomic_write_text(path, json.dumps(redact(obj), indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in rows))


def write_yaml(path: Path, obj: Any) -> None:
    """Atomic YAML, with secret-looking keys redacted (:func:`bench.redaction.redact`)."""
    atomic_write_text(path, yaml.safe_dump(redact(obj), sort_keys=False))


def read_record(path: Path) -> dict[str, Any] | None:
    """The record at ``path``, or ``None`` if it is unreadable (reported by the caller, never fatal)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def iter_records(results_dir: str | Path) -> list[tuple[Path, dict[str, Any] | None]]:
    """All ``runs/*/record.json`` under ``results_dir``, sorted by path; unreadable ones as ``None``."""
    root = Path(results_dir) / "runs"
    return [(p, read_record(p)) for p in sorted(root.glob("*/record.json"))]
