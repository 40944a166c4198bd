"""Where a vision-side selection's time goes: per-kernel table of VisPruner's and ToMe's selection (issue 4).

``scripts/bench_selection.py`` times whole selections; this script breaks the two slowest (the last
two to meet the 0.3 ms batch-1 target) down by kernel, on random inputs of LLaVA-1.5's shapes (576 patches, 1024-wide
CLIP features, 64-wide head-mean keys for ToMe's metric, fp16 on CUDA):

* ``vispruner``: :func:`methods.vispruner.vispruner_select` (``backend="auto"``'s choice: ``cuda``
  on CUDA, ``torch`` elsewhere), 576 -> ``--kept``;
* ``tome``: the matching and size-weighted merge of all 23 blocks (:func:`methods.tome.bipartite_soft_matching`,
  :func:`methods.tome.merge_wavg`) on the schedule that lands on ``--kept``, each block on its own
  random tokens of the right count.

Per method it prints (and writes to ``--out`` as CSV) the median CUDA-graph replay time (CUDA only),
the kernels per call and, per kernel name, launches and device time per call (``torch.profiler``,
averaged over ``--repeats`` eager calls). On CPU the table lists CPU operator times instead (a smoke check).

    python scripts/profile_selection.py --out /tmp/profile_selection.csv            # H100
    python scripts/profile_selection.py --device cpu --repeats 1                     # smoke
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench.measure.latency import capture_graph  # noqa: E402
from bench.measure.timing import time_fn  # noqa: E402
from methods.tome import bipartite_soft_matching, merge_wavg, tome_schedule  # noqa: E402
from methods.vispruner import cosine_similarity, vispruner_select  # noqa: E402


def workloads(device: str, kept: int, g: torch.Generator) -> dict:
    dtype = torch.float16 if device == "cuda" else torch.float32
    score = torch.rand(1, 576, generator=g).to(device, dtype)
    feats = torch.randn(1, 576, 1024, generator=g).to(device, dtype)
    backend = "cuda" if device == "cuda" else "torch"

    def vispruner():
        return vispruner_select(score, cosine_similarity(feats), kept // 2, kept - kept // 2, 8, backend)

    sched = tome_schedule(576, kept, 23, True)
    blocks, t = [], 577
    for r in sched:
        x = torch.randn(1, t, 1024, generator=g).to(device, dtype)
        metric = torch.randn(1, t, 64, generator=g).to(device, dtype)
        size = torch.randint(1, 4, (1, t, 1), generator=g).to(device, dtype)
        blocks.append((x, metric, size, r))
        t -= r

    def tome():
        return [merge_wavg(x, s, bipartite_soft_matching(m, r, True)) for x, m, s, r in blocks]

    return {"vispruner": vispruner, "tome": tome}


def graph_median_ms(fn, n: int) -> float:
    """Median CUDA-event time of replaying ``fn`` captured in a CUDA graph (the harness's capture and timer)."""
    graph, _ = capture_graph(fn, warmup=3)
    return time_fn(graph.replay, torch.device("cuda"), warmup=3, repeats=n).median_ms


def kernel_table(fn, device: str, repeats: int) -> list[tuple[str, float, float]]:
    """``(name, launches per call, us per call)``, largest time first (CPU: operators and CPU time)."""
    fn()
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            fn()
        if cuda:
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = (e.device_time_total if cuda else e.self_cpu_time_total) / repeats
        if us > 0:
            rows.append((e.key, e.count / repeats, us))
    return sorted(rows, key=lambda r: -r[2])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--kept", type=int, default=64, help="visual tokens kept of 576 (default 64)")
    ap.add_argument("--methods", default="vispruner,tome")
    ap.add_argument("--repeats", type=int, default=10, help="profiled calls (default 10)")
    ap.add_argument("--graph-repeats", type=int, default=200, help="timed graph replays (CUDA; default 200)")
    ap.add_argument("--top", type=int, default=15, help="kernels printed per method")
    ap.add_argument("--out", default=None, help="CSV of every kernel row (optional)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here (use --device cpu for a smoke check)")
    if not 0 < args.kept < 576:
        ap.error("--kept must be in 1..575")
    if args.repeats < 1 or args.graph_repeats < 1:
        ap.error("--repeats and --graph-repeats must be >= 1")
    work = workloads(args.device, args.kept, torch.Generator().manual_seed(0))
    names = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(names) - set(work))
    if unknown:
        ap.error(f"unknown method(s) {unknown}; choose from {sorted(work)}")
    out_rows = []
    for name in names:
        fn = work[name]
        graph_ms = graph_median_ms(fn, args.graph_repeats) if args.device == "cuda" else None
        rows = kernel_table(fn, args.device, args.repeats)
        total, launches = sum(r[2] for r in rows), sum(r[1] for r in rows)
        head = f"== {name} 576 -> {args.kept} B=1 on {args.device}: "
        head += f"graph replay median {graph_ms:.3f} ms; " if graph_ms is not None else ""
        print(head + f"{launches:.0f} {'kernels' if args.device == 'cuda' else 'operator calls'} per call, {total:.1f} us per call")
        for key, count, us in rows[: args.top]:
            print(f"{us:10.1f} us {count:7.1f}x  {key[:110]}")
        out_rows += [{"method": name, "kept": args.kept, "device": args.device, "graph_median_ms": graph_ms,
                      "kernel": key, "launches_per_call": count, "us_per_call": round(us, 3)} for key, count, us in rows]
    if args.out:
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(out_rows[0]))
            w.writeheader()
            w.writerows(out_rows)
        print(f"wrote {args.out} ({len(out_rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
