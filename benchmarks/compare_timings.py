"""Join two timing CSVs of the same benchmark (an earlier checkout's and this tree's) and write their ratio.

Used for the regression checks of refactors: ``gpu_family_rows.sh`` with ``PREV=<dir>`` times the earlier code and
then this tree's on the same card, and this script writes one row per measured configuration with both medians,
both interquartile ranges, ``new / old`` and whether the new median lies inside ``[p25, p75]`` widened by the two runs'
own spread (``within_spread``). Rows measured on different cards are refused (exit 2).

    python benchmarks/compare_timings.py --old results/x/selection_prev.csv --new results/x/selection.csv \
        --out results/x/selection_compare.csv
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

#: per benchmark: the columns that name a configuration, the median and its spread (None: no spread column)
KINDS = {
    "selection": (("method", "mode", "batch", "kept"), "median_ms", ("p25_ms", "p75_ms")),
    "inllm": (("method", "batch", "mode"), "overhead_ms", None),
}


def kind_of(fields: list[str]) -> str:
    if "kept" in fields and "median_ms" in fields:
        return "selection"
    if "overhead_ms" in fields:
        return "inllm"
    print(f"error: not a selection or in-LLM timing CSV (columns {fields[:6]}...)", file=sys.stderr)
    raise SystemExit(2)


def load(path: Path) -> tuple[str, list[dict]]:
    if not path.is_file():
        print(f"error: no such file: {path}", file=sys.stderr)
        raise SystemExit(2)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return kind_of(list(reader.fieldnames or [])), rows


def num(v: str | None) -> float | None:
    try:
        return float(v) if v not in (None, "") else None
    except ValueError:
        return None


def compare(old: list[dict], new: list[dict], kind: str) -> list[dict]:
    keys, med, spread = KINDS[kind]
    cards = {r.get("gpu") for r in old + new if r.get("gpu")}
    if len(cards) > 1:
        print(f"error: the two CSVs were timed on different cards ({', '.join(sorted(cards))}): not comparable", file=sys.stderr)
        raise SystemExit(2)
    by_key = {tuple(r[k] for k in keys): r for r in old}
    out = []
    for r in new:
        k = tuple(r[c] for c in keys)
        o = by_key.get(k)
        a, b = num(o.get(med)) if o else None, num(r.get(med))
        row = dict(zip(keys, k)) | {"old": a, "new": b, "ratio": round(b / a, 3) if a and b is not None else None}
        if spread and o:
            lo_o, hi_o, lo_n, hi_n = (num(x.get(s)) for x in (o, r) for s in spread)
            if None not in (lo_o, hi_o, lo_n, hi_n, a, b):
                width = abs(hi_o - lo_o) + abs(hi_n - lo_n)
                row["within_spread"] = abs(b - a) <= width
        row["gpu"] = r.get("gpu", "")
        out.append(row)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", type=Path, required=True)
    ap.add_argument("--new", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    k_old, old = load(args.old)
    k_new, new = load(args.new)
    if k_old != k_new:
        print(f"error: {args.old} is a {k_old} CSV, {args.new} a {k_new} CSV", file=sys.stderr)
        return 2
    rows = compare(old, new, k_new)
    fields = list(dict.fromkeys(f for r in rows for f in r))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(args.out)
    print(f"wrote {args.out} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
