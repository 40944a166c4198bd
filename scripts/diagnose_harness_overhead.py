#!/usr/bin/env python
"""Where the harness spends time around generation: ``generate_until`` called directly vs through
``lmms_eval.evaluator.simple_evaluate``, with the phase split and the garbage collector's time (issue 8).

For each batch size it times one pass of ``TokenPruneLlava.generate_until`` on SynthVQA requests built
as the task builds them (``direct``), then one ``simple_evaluate`` of the same questions as
``scripts/bench_throughput.py`` runs it (``harness``). Both report samples/s, the time of the phases
``inputs`` / ``prepare`` / ``generate`` (``TokenPruneLlava.time_phases``) and the time spent in
garbage collections (``gc.callbacks``). ``--no-gc-freeze`` turns off the ``gc.freeze()`` that
``generate_until`` does, to see what it saves: this script is how the 0.37 s of collections in a
2.8 s batch-16 evaluation (H100, LLaVA-1.5-7B random weights, DivPrune at 64 tokens, 64 questions)
was found.

    python scripts/diagnose_harness_overhead.py --no-gc-freeze --out $OUT/harness_overhead.csv   # GPU: 7B, random weights
    python scripts/diagnose_harness_overhead.py --smoke --out /tmp/h.csv                      # CPU: embedded model
"""

from __future__ import annotations

import argparse
import csv
import gc
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402

COLUMNS = ["path", "batch", "n_questions", "samples_per_s", "seconds", "inputs_s", "prepare_s", "generate_s", "gc_s", "gc_collections", "gc_freeze"]


class GcTimer:
    """Wall time spent inside garbage collections while installed (``gc.callbacks``)."""

    def __init__(self) -> None:
        self.seconds, self.count, self._t0 = 0.0, 0, 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._t0
            self.count += 1

    def reset(self) -> None:
        self.seconds, self.count = 0.0, 0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llava15_7b")
    ap.add_argument("--weights", default="random", choices=["random", "pretrained"])
    ap.add_argument("--method", default="divprune")
    ap.add_argument("--kept", type=int, default=64, help="visual tokens kept")
    ap.add_argument("--batches", nargs="*", type=int, default=[16, 1])
    ap.add_argument("--n", type=int, default=64, help="questions per batch > 1 (batch 1: a quarter)")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-gc-freeze", action="store_true", help="disable generate_until's gc.freeze() (the behaviour before it)")
    ap.add_argument("--smoke", action="store_true", help="CPU check: embedded model, 8 questions, batches 4 and 1")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.smoke:
        args.model, args.weights, args.device, args.n, args.batches, args.new_tokens = "tiny_llava_synth", "pretrained", "cpu", 8, [4, 1], 2
        torch.set_num_threads(1)

    import bench_throughput as bt
    from lmms_eval.tasks import TaskManager

    from bench.lmms_model import TokenPruneLlava
    from bench.build import build_adapter, build_method, compose_config
    from bench.synthvqa.data import load_test
    from bench.tasks.synthvqa import prepare_task_dir

    if args.no_gc_freeze:  # what generate_until calls; patched for this process only
        gc.freeze = gc.unfreeze = lambda: None
    base = [f"model={args.model}", f"model.weights={args.weights}", f"device={args.device}", "logger=none"]
    adapter = build_adapter(compose_config(base)).load()
    if adapter.processor is None:
        adapter.processor = bt.stand_in_processor(adapter.config)
    n_vis = adapter.grid[0] * adapter.grid[1]
    cfg = compose_config([*base, f"method={args.method}", f"ratio={0.0 if args.method == 'none' else 1 - args.kept / n_vis}"])
    method = build_method(cfg)
    docs = load_test(n=args.n)
    tm = TaskManager(include_path=str(prepare_task_dir(None, n=args.n)), include_defaults=False, verbosity="ERROR")
    gen = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "until": ["\n\n"]}
    timer = GcTimer()
    gc.callbacks.append(timer)
    rows = []

    def row(path: str, b: int, n: int, seconds: float, phases: dict) -> None:
        rows.append({"path": path, "batch": b, "n_questions": n, "samples_per_s": round(n / seconds, 4), "seconds": round(seconds, 4),
                     **{f"{k}_s": round(v, 4) for k, v in phases.items()}, "gc_s": round(timer.seconds, 4),
                     "gc_collections": timer.count, "gc_freeze": not args.no_gc_freeze})
        print(f"[harness] {path:>7} b={b:>2}: {n} q in {seconds:.2f} s = {n / seconds:.2f}/s, phases "
              f"{ {k: round(v, 3) for k, v in phases.items()} }, GC {timer.seconds:.3f} s in {timer.count} collections", flush=True)

    for b in args.batches:
        n = args.n if b > 1 else max(1, args.n // 4)
        lm = TokenPruneLlava(adapter=adapter, method=method, batch_size=b, seed=cfg["seed"])
        lm.task_dict = {"synthvqa": {"test": docs}}
        lm.generate_until(bt.warm_requests(docs, b, gen))  # untimed warm-up batch
        lm.time_phases = True
        timer.reset()
        bt.sync(adapter.device)
        t0 = time.perf_counter()
        lm.generate_until(bt.warm_requests(docs, n, gen))
        bt.sync(adapter.device)
        row("direct", b, n, time.perf_counter() - t0, lm.phase_s)
    for b in args.batches:
        n = args.n if b > 1 else max(1, args.n // 4)
        timer.reset()
        r = bt.evaluate(adapter, method, cfg, b, n, args.new_tokens, tm, docs)
        row("harness", b, n, r["eval_s"], r["phase_s"])
    gc.callbacks.remove(timer)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
