"""Efficiency CSVs of one kind of GPU: merging a re-measurement into an earlier CSV, and replacing a CSV atomically.

The GPU benchmarks (``benchmarks/family_efficiency.py``, ``benchmarks/efficiency_leaderboard.py``) write one
CSV per kind of card (``results/efficiency/llava15_7b_h100.csv``) and run in time-boxed calls, so a sweep is
split over calls and joined: a merge keeps the earlier rows that this call does not re-measure and replaces
those it does. Timings are comparable only on one kind of card, so a merge that would mix cards is refused.

Imports only the standard library (the lent GPU machine has no lmms-eval, no hydra).
"""

from __future__ import annotations

import contextlib
import csv
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path


class MixedDevicesError(SystemExit):
    """A merge would put rows of two kinds of card in one CSV. A ``SystemExit`` with code 2 (bad input) so that a
    sweep's per-run ``except Exception`` cannot swallow it; ``str()`` is the message."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _blank(value) -> bool:
    """Empty cell: ``None``, ``""`` or NaN (pandas' reading of one)."""
    return value is None or value == "" or (isinstance(value, float) and value != value)


def _cell(value):
    """One cell of a merge key, comparable however the CSV was read: ``64``, ``"64"``, ``64.0`` and
    ``numpy.int64(64)`` are one value; a blank cell is ``""``; other text is itself."""
    if _blank(value):
        return ""
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def devices(rows: Iterable[Mapping], field: str) -> set[str]:
    """The non-blank device names of ``rows`` in ``field``."""
    return {str(r.get(field)) for r in rows if not _blank(r.get(field))}


def rows_to_keep(new: Sequence[Mapping], old: Sequence[Mapping], *, key: Sequence[str], device: str,
                 drop: Iterable[str] = (), drop_field: str = "method", source: str = "--merge") -> list[int]:
    """Indices of the ``old`` rows (an earlier CSV) that a merge with ``new`` (rows measured now) keeps: those
    whose ``key`` cells no new row has, less those whose ``drop_field`` is in ``drop`` (stale rows). Rows are
    dicts, read with ``csv`` (text) or pandas (numbers, NaN for blanks); key cells compare as numbers where
    they are numbers.

    Refuses, with :class:`MixedDevicesError` (exit code 2, message on stderr), new rows whose ``device`` names
    differ from the old rows' (blank cells do not count; no new rows mixes nothing). ``source`` names the
    earlier CSV in the message."""
    old_devs, new_devs = devices(old, device), devices(new, device)
    if new and len(old_devs | new_devs) > 1:
        msg = (f"{source}: its rows were measured on {sorted(old_devs)}, these on {sorted(new_devs)}; "
               "timings are comparable only on one kind of card: write a separate CSV per GPU")
        print(f"error: {msg}", file=sys.stderr, flush=True)
        raise MixedDevicesError(msg)
    drop = set(drop)
    done = {tuple(_cell(r.get(k)) for k in key) for r in new}
    return [i for i, r in enumerate(old)
            if tuple(_cell(r.get(k)) for k in key) not in done and not (drop and r.get(drop_field) in drop)]


def read_rows(path: Path) -> list[dict]:
    """The rows of a CSV as dicts of text (``csv.DictReader``)."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@contextlib.contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """Yields a temporary path beside ``path`` to write, then renames it over ``path``: a reader (or a GPU call
    cut short mid-write) never sees half a table. On an error the temporary file is removed and ``path`` is
    left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_rows(path: Path, rows: Sequence[Mapping], fieldnames: Sequence[str]) -> None:
    """``rows`` as a CSV with columns ``fieldnames`` (missing cells empty, other keys left out), atomically."""
    with replaced_atomically(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(fieldnames), restval="", extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
