"""Efficiency CSVs of one kind of GPU: the card's short tag in their file names, merging a re-measurement into an
earlier CSV, and replacing a CSV atomically.

The GPU benchmarks (``benchmarks/family_efficiency.py``, ``benchmarks/efficiency_leaderboard.py``) write one
CSV per kind of card (``results/efficiency/llava15_7b_h100.csv``) and run in time-boxed calls, so a sweep is
split over calls and joined: a merge keeps the earlier rows that this call does not re-measure and replaces
those it does. Timings are comparable only on one kind of card, so a merge that would mix cards is refused.

Imports only the standard library: the shell scripts of the lent GPU machine (no lmms-eval, no hydra, PYTHONPATH
from ``scripts/gpu_env.sh``) call ``python3 -m bench.measure.gpu_csv`` for the tag; torch is never imported.

    python3 -m bench.measure.gpu_csv                           # the tag of nvidia-smi's first GPU: h100
    python3 -m bench.measure.gpu_csv "NVIDIA A100-SXM4-80GB"   # a100
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import re
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

# A model code such as H100, A100, L40S, T4, A10G, GH200, MI300X: one or two capitals, then digits, an optional
# letter suffix; a whole word (so HBM3, SXM4 and 80GB are not one).
_MODEL_CODE = re.compile(r"\b([A-Z]{1,2}\d{1,4}[A-Za-z]?)\b")
# words that name the vendor or product line, not the card (dropped from names without a model code)
_LINE_WORDS = {"nvidia", "geforce", "tesla", "quadro", "amd", "radeon", "instinct", "generation", "graphics"}


def device_tag(name: str) -> str:
    """Short lower-case name of a device for file names, from its full name (``torch.cuda.get_device_name``
    or ``nvidia-smi --query-gpu=name``): ``h100`` for "NVIDIA H100 80GB HBM3" and "NVIDIA H100 PCIe",
    ``a100`` for "NVIDIA A100-SXM4-80GB", ``l40s`` for "NVIDIA L40S", ``cpu`` for "cpu". A name without such
    a model code joins its remaining words: ``rtx4090`` for "NVIDIA GeForce RTX 4090"."""
    name = name.strip()
    m = _MODEL_CODE.search(name)
    if m:
        return m.group(1).lower()
    words = [w for w in re.split(r"[^A-Za-z0-9]+", name.lower()) if w and w not in _LINE_WORDS]
    if not words:
        raise ValueError(f"no device tag in {name!r}")
    return "".join(words)


def nvidia_smi_name() -> str:
    """The name of the first GPU ``nvidia-smi`` lists (the card the GPU scripts run on)."""
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip().splitlines()[0]


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
    return value is None or value == "" or (isinstance(value, float) and math.isnan(value))


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


def main(argv: list[str] | None = None) -> int:
    """``python3 -m bench.measure.gpu_csv [NAME]``: print the tag of NAME, else of nvidia-smi's first GPU."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) > 1 or (argv and argv[0].startswith("-")):
        print("usage: python3 -m bench.measure.gpu_csv [DEVICE_NAME]   (default: nvidia-smi's first GPU)", file=sys.stderr)
        return 2
    try:
        name = argv[0] if argv else nvidia_smi_name()
        print(device_tag(name))
    except (OSError, subprocess.SubprocessError, IndexError, ValueError) as e:
        print(f"error: no GPU tag: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
