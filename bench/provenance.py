"""Where a record came from (its ``provenance``): commit, environment, settings and host."""

from __future__ import annotations

import datetime as _dt
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

import torch

from bench import environment

REPO_ROOT = Path(__file__).resolve().parent.parent

#: what ``git_dirty`` looks at: the code and settings that decide a run's result
RESULT_DECIDING_PATHS = ("bench", "methods", "kernels", "conf", "pyproject.toml", "requirements")


def now() -> str:
    """The current UTC time, ISO-8601 to the second (``started_at``, ``finished_at``, ``date``)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def git_state(root: Path) -> tuple[str | None, bool | None]:
    """``(HEAD commit, dirty)`` of the checkout at ``root``; ``dirty`` looks only at uncommitted changes to
    :data:`RESULT_DECIDING_PATHS` (results/, rewritten by every run, and docs never count).
    ``(None, None)`` outside a git checkout (an installed wheel)."""

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        except Exception:  # noqa: BLE001
            return None

    dirty = git("status", "--porcelain", "--untracked-files=no", "--", *RESULT_DECIDING_PATHS)
    return git("rev-parse", "HEAD"), None if dirty is None else bool(dirty)


def provenance(cfg: dict[str, Any], adapter, fingerprints: dict[str, str], batch_size: int | None = None) -> dict[str, Any]:
    """The record's ``provenance`` (keys in ``bench.schema.Provenance``).

    ``batch_size``: the evaluation batch actually used (``benchmark.batch_size=auto`` resolved)."""
    from importlib.metadata import PackageNotFoundError, version

    def ver(pkg: str) -> str | None:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    setting = cfg["benchmark"]["batch_size"]  # an int, or "auto" (unresolved when no evaluation ran)
    sha, dirty = git_state(REPO_ROOT)
    return {
        "git_sha": sha,
        "git_dirty": dirty,
        "versions": {"torch": torch.__version__, "transformers": ver("transformers"), "lmms_eval": ver("lmms_eval"), "python": platform.python_version()},
        **environment.summary(),
        "dtype": str(adapter.dtype).replace("torch.", ""),
        "attn_implementation": adapter.attn_implementation,
        "batch_size": batch_size if batch_size is not None else (setting if isinstance(setting, int) else None),
        "batch_size_setting": setting,
        "model_fingerprint": fingerprints["model"],
        "weights_revision": adapter.weights_revision(),
        "weights_format": adapter.weights_format(),
        "pickle_weights_allowed": bool((cfg.get("model") or {}).get("allow_pickle_weights", False)),
        "benchmark_fingerprint": fingerprints["benchmark"],
        **({"text_tower_fingerprint": fingerprints["text_tower"]} if "text_tower" in fingerprints else {}),
        "date": now(),
        "hostname": socket.gethostname(),
        "cpu": environment.cpu(),
    }
