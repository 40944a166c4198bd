"""Secrets never reach disk: config keys that look like credentials are redacted wherever the harness
writes or logs a config (records, ``config.yaml``, W&B config, log lines).

A key is secret-looking when its last word (split at ``_``, ``-``, ``.`` and camelCase) is ``key``,
``apikey``, ``token``, ``password``, ``passwd``, ``secret`` or ``credential(s)``, or any word is ``password``,
``secret``, ``apikey`` or ``credential(s)``: ``api_key``, ``hf_token``, ``wandbApiKey``, ``db_password``,
``client_secret_id``. Numbers and booleans under such keys stay (``pivot_image_token: 4``), as do keys where
``token`` is not the last word (``image_token_ratio_list``, ``max_new_tokens``). Values seen under secret keys
are also masked in every log message (:func:`install_log_filter`) and, on the command line, handed to Hydra
through an environment variable so that Hydra's own ``multirun.yaml`` never holds them
(:func:`hide_secret_overrides`).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

REDACTED = "<redacted>"
SECRET_WORDS = frozenset({"key", "apikey", "token", "password", "passwd", "secret", "credential", "credentials"})
#: words that make a key secret wherever they stand in it
SECRET_ANYWHERE = frozenset({"apikey", "password", "passwd", "secret", "credential", "credentials"})
_SEEN: set[str] = set()


def is_secret_key(key: Any) -> bool:
    """True when a word of ``key`` names a credential (``api_key``, ``hfToken``; not ``max_new_tokens``)."""
    words = re.split(r"[_\-.\s]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(key)))
    words = [w.lower() for w in words if w]
    if len(words) >= 2 and words[-2:] == ["api", "key"]:
        return True
    return bool(words) and (words[-1] in SECRET_WORDS or any(w in SECRET_ANYWHERE for w in words))


def redact(obj: Any) -> Any:
    """A copy of ``obj`` (dicts, lists, scalars) with every string or sub-tree under a secret key replaced by
    :data:`REDACTED`; the secret values are remembered for :func:`mask`."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if is_secret_key(k) and v is not None and not isinstance(v, (bool, int, float)):
                _remember(v)
                out[k] = REDACTED
            else:
                out[k] = redact(v)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    return obj


def _remember(v: Any) -> None:
    if isinstance(v, dict):
        for x in v.values():
            _remember(x)
    elif isinstance(v, (list, tuple)):
        for x in v:
            _remember(x)
    elif isinstance(v, str) and len(v) >= 4:
        _SEEN.add(v)


def mask(text: str) -> str:
    """``text`` with every secret value seen so far replaced by :data:`REDACTED`."""
    for s in sorted(_SEEN, key=len, reverse=True):
        if s in text:
            text = text.replace(s, REDACTED)
    return text


def install_log_filter() -> None:
    """Mask remembered secrets in every log record, whatever handler (Hydra's, lmms-eval's) writes it."""
    factory = logging.getLogRecordFactory()
    if getattr(factory, "_bench_masks", False):
        return

    def make(*args: Any, **kwargs: Any) -> logging.LogRecord:
        rec = factory(*args, **kwargs)
        if _SEEN:
            try:
                msg = rec.getMessage()
            except Exception:  # noqa: BLE001 - a malformed log call is logging's to report
                return rec
            masked = mask(msg)
            if masked != msg:
                rec.msg, rec.args = masked, ()
        return rec

    make._bench_masks = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(make)


def hide_secret_overrides(args: list[str]) -> list[str]:
    """Command-line overrides with secret-looking keys rewritten to ``key=${oc.env:BENCH_SECRET_<i>}``.

    Hydra keeps the overrides it was given (a sweep's ``multirun.yaml``, the job's ``hydra.overrides``);
    with the value in the process environment instead, those files hold only the interpolation.
    """
    out = []
    for i, arg in enumerate(args):
        if arg.startswith("-") or "=" not in arg:
            out.append(arg)
            continue
        key, value = arg.split("=", 1)
        if is_secret_key(key.lstrip("+~").rsplit(".", 1)[-1]) and value and not value.startswith("${"):
            var = f"BENCH_SECRET_{i}"
            os.environ[var] = value
            _SEEN.add(value) if len(value) >= 4 else None
            out.append(f"{key}=${{oc.env:{var}}}")
        else:
            out.append(arg)
    return out
