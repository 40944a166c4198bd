#!/usr/bin/env python
"""Evaluation throughput through the whole harness path, and whether answers depend on the batch.

Each point is one real ``lmms_eval.evaluator.simple_evaluate`` of SynthVQA with the project's
lmms-eval model (``bench.lmms_model.TokenPruneLlava``: length-grouped batches, left padding,
per-sample pruning, greedy ``generate``) at a given batch size, for ``none``, a pre-LLM method
and an in-LLM method at 64 kept visual tokens (issue 8).

The model is LLaVA-1.5-7B built from its architecture config with random weights (gpu.md: no
weights can be downloaded there). The work is real, the answers are meaningless. Its tokenizer
cannot be downloaded either, so a stand-in processor is built (:func:`stand_in_processor`):
LLaVA-1.5's image processor and chat template with a word-level tokenizer over SynthVQA's words,
placed in the config's vocabulary with the checkpoint's special ids (``<image>`` = 32000). Prompts are
therefore a few tokens shorter than with Llama's sub-word tokenizer (576 image tokens + 20-24 text
tokens, one per word or punctuation mark). Every question generates exactly ``--new-tokens`` tokens
(``min_new_tokens = max_new_tokens``, passed as lmms-eval ``gen_kwargs``), so all batch sizes do
the same work.

Timing: after one warm-up batch of the same lmms model, the device is synchronised and the wall
clock runs around ``simple_evaluate`` (dataset load, request building, generation, metrics):
``samples_per_s = n_questions / eval_s``. ``samples_per_s_generate`` counts only the time inside
the model's ``generate_until`` (image preprocessing, vision tower, pruning, generation, decoding).
That time is split into ``inputs_s`` (documents -> processor batch, CPU), ``prepare_s`` (vision
tower, pre-LLM method, embeddings) and ``llm_s`` (generate with any in-LLM method), each closed by a
device synchronisation.

Repeats: each method's batch sizes are timed in ``--repeats`` interleaved rounds (round 1: batch 1,
8, 16, auto; round 2: the same again; ...), so a slow spell of a shared host (the decoding loop is
bound by the CPU's kernel launches, and batch-16 throughput was seen to vary 1.6x between processes)
hits one round of every batch size rather than all rounds of one. A row reports its median round
(``samples_per_s``, ``eval_s`` and the phase times all come from that round; ``median_low`` for an
even count), the spread over rounds (``samples_per_s_min`` / ``_max``), whether every round generated
the same ids (``identical_rate_across_repeats``) and the host's load (``loadavg_1m``, read just before
the reported round's timed evaluation).
``speedup_vs_b1`` divides the medians.

Identity: for every method, the generated token ids of each question at batch > 1 are compared
with batch 1 (``identical_rate_vs_b1``; ``identical_first_token_rate_vs_b1`` compares only the
first generated token). Random weights give near-uniform next-token distributions with tiny
margins, so in fp16 this rate is a pessimistic estimate of what a trained model shows.

    python benchmarks/bench_throughput.py --out results/throughput_h100.csv        # GPU, all three methods in one process
    python benchmarks/bench_throughput.py --methods fastv --append --out results/throughput_h100.csv
        # one method per process (each a few minutes: where one call may run at most 10 min), added to the CSV
    python benchmarks/bench_throughput.py --smoke --out /tmp/throughput_smoke.csv  # CPU, embedded tiny model
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

TASK = "synthvqa"
COLUMNS = [
    "method", "stage", "ratio", "kept_tokens", "visual_tokens_kept_mean", "visual_tokens_layer_mean",
    "batch", "batch_setting", "n_questions", "new_tokens",
    "samples_per_s", "eval_s", "samples_per_s_generate", "generate_s", "speedup_vs_b1",
    "identical_rate_vs_b1", "identical_first_token_rate_vs_b1", "identical_text_rate_vs_b1", "n_compared_vs_b1",
    "distinct_outputs", "peak_mem_gb",
    "model", "weights", "processor", "device", "gpu", "driver", "cuda", "torch", "transformers", "lmms_eval", "datasets", "python",
    "dtype", "attn", "auto_batch", "inputs_s", "prepare_s", "llm_s",
    "repeats", "samples_per_s_min", "samples_per_s_max", "identical_rate_across_repeats",
    "cpu_count", "torch_threads", "loadavg_1m",
]  # fmt: skip


def stand_in_processor(config):
    """A LLaVA-1.5 processor for ``config`` when the checkpoint's tokenizer is not available.

    LLaVA-1.5's CLIP image processor (336 px) and chat template, and a word-level tokenizer whose
    vocabulary has exactly ``config``'s size: the checkpoint's special ids (``<s>``, ``</s>``,
    ``<image>`` and ``<pad>`` where the config puts them, ``<unk>`` at the first free id), then
    the chat template's and SynthVQA's words, then fillers ``tok<id>``. Every id decodes to its own
    word, so two generations give the same text only if they are the same ids.
    """
    from bench.synthvqa.generator import VOCAB
    from bench.tiny_llava import TEMPLATE_WORDS, build_processor, build_tokenizer

    tc = config.text_config
    size = int(tc.vocab_size)
    pad = getattr(config, "pad_token_id", None)
    special = {
        int(tc.bos_token_id): "<s>",
        int(tc.eos_token_id): "</s>",
        int(getattr(config, "image_token_id", None) or config.image_token_index): "<image>",
        int(pad if pad is not None else tc.pad_token_id): "<pad>",
    }
    if len(special) != 4 or max(special) >= size:
        raise ValueError(f"config's special token ids {special} collide or exceed the vocabulary ({size})")
    free = (i for i in range(size) if i not in special)
    vocab = {w: i for i, w in special.items()}
    vocab["<unk>"] = next(free)
    for w in [*TEMPLATE_WORDS, *VOCAB]:
        if w not in vocab:
            vocab[w] = next(free)
    for i in free:
        vocab[f"tok{i}"] = i
    assert len(vocab) == size
    fast = build_tokenizer(vocab, model_max_length=int(getattr(tc, "max_position_embeddings", 4096)))
    return build_processor(fast)


def driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] or None
    except Exception:  # noqa: BLE001 - no nvidia-smi (CPU machine)
        return None


def ver(pkg: str) -> str | None:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_requests(docs: list[dict], n: int, gen_kwargs: dict) -> list:
    """The first ``n`` SynthVQA questions as lmms-eval requests, built the way the task builds them."""
    from lmms_eval.api.instance import Instance

    from bench.tasks.synthvqa.task_utils import synthvqa_doc_to_text, synthvqa_doc_to_visual

    kw = {"post_prompt": "\nAnswer the question using a single word."}
    return [
        Instance("generate_until", (synthvqa_doc_to_text(d, kw), dict(gen_kwargs), synthvqa_doc_to_visual, i, TASK, "test"), idx=0, metadata={"task": TASK, "doc_id": i, "repeats": 1})
        for i, d in enumerate(docs[:n])
    ]


def evaluate(adapter, method, cfg: dict, batch, n: int, new_tokens: int, task_manager, docs: list[dict]) -> dict[str, Any]:
    """One timed ``simple_evaluate`` at ``batch`` (an int or ``"auto"``) after a warm-up batch."""
    from lmms_eval.evaluator import simple_evaluate

    from bench.lmms_model import TokenPruneLlava

    dev = adapter.device
    gen = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "until": ["\n\n"]}
    lm = TokenPruneLlava(adapter=adapter, method=method, batch_size=batch, seed=cfg["seed"])
    lm.task_dict = {TASK: {"test": docs}}
    lm.generate_until(warm_requests(docs, lm.batch_size or 16, gen))  # resolves `auto` too
    lm.stats.clear()
    lm.generate_s = 0.0
    lm.time_phases = True  # three syncs per batch; prepare and generate end in host reads anyway
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    sync(dev)
    t0 = time.perf_counter()
    results = simple_evaluate(
        model=lm,
        model_args=f"model={cfg['model']['name']},method={cfg['method']['name']},ratio={cfg['ratio']},batch={batch},purpose=throughput",
        tasks=[TASK],
        limit=n,
        batch_size=lm.batch_size,
        task_manager=task_manager,
        gen_kwargs=f"max_new_tokens={new_tokens},min_new_tokens={new_tokens}",
        log_samples=True,
        use_cache=None,
        bootstrap_iters=0,
        random_seed=cfg["seed"],
        numpy_random_seed=cfg["seed"],
        torch_random_seed=cfg["seed"],
        verbosity="WARNING",
        process_docs_parallel=1,
    )
    sync(dev)
    eval_s = time.perf_counter() - t0
    if results is None or TASK not in results.get("results", {}):
        raise RuntimeError("lmms-eval returned no results")
    texts = {}
    for s in results["samples"][TASK]:
        resp = s.get("filtered_resps") or s.get("resps") or [None]
        while isinstance(resp, list) and resp:
            resp = resp[0]
        texts[s["doc_id"]] = resp
    ids = {s["doc_id"]: s["generated_ids"] for s in lm.stats}
    if len(ids) != n or len(texts) != n:
        raise RuntimeError(f"expected {n} answered questions, got {len(ids)} generations and {len(texts)} samples")
    lengths = {len(v) for v in ids.values()}
    if lengths != {new_tokens}:
        raise RuntimeError(f"generated lengths {sorted(lengths)} differ from the fixed {new_tokens} tokens")
    st = lm.stats
    return {
        "ids": ids,
        "texts": texts,
        "batch": lm.batch_size,
        "auto_batch": lm.auto_batch,
        "eval_s": eval_s,
        "generate_s": lm.generate_s,
        "phase_s": dict(lm.phase_s),
        "kept_mean": sum(s["visual_tokens_kept"] for s in st) / len(st),
        "layer_mean": sum(sum(s["visual_tokens_per_layer"]) / len(s["visual_tokens_per_layer"]) for s in st) / len(st),
        "peak_mem_gb": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
    }


def agreement(ref: dict[str, Any], cur: dict[str, Any]) -> dict[str, Any]:
    """Share of questions (answered in both) whose generations are identical."""
    common = sorted(set(ref["ids"]) & set(cur["ids"]))
    if not common:
        return {"identical_rate_vs_b1": None, "identical_first_token_rate_vs_b1": None, "identical_text_rate_vs_b1": None, "n_compared_vs_b1": 0}
    n = len(common)
    return {
        "identical_rate_vs_b1": sum(ref["ids"][d] == cur["ids"][d] for d in common) / n,
        "identical_first_token_rate_vs_b1": sum(ref["ids"][d][:1] == cur["ids"][d][:1] for d in common) / n,
        "identical_text_rate_vs_b1": sum(ref["texts"][d] == cur["texts"][d] for d in common) / n,
        "n_compared_vs_b1": n,
    }


def write_csv(rows: list[dict], path: Path, append_to: list[dict] | None = None) -> None:
    """Write ``append_to`` (rows read from an existing CSV, as they were) then ``rows``, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(append_to or [])
        for r in rows:
            w.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
    tmp.replace(path)


def read_existing(path: Path) -> list[dict]:
    """The rows of a CSV this script wrote (for ``--append``); refuses one with other columns."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames != COLUMNS:
            raise SystemExit(f"error: {path} has other columns than this script writes; --append needs a CSV of the same version")
        return list(reader)


def point_row(name: str, stage: str, ratio: float, args, n_vis: int, batch, n: int, runs: dict, ref_batch, env: dict) -> dict[str, Any]:
    """One CSV row: the median round of ``runs[batch]`` (``median_low``), its spread and identity rates.

    The identity reference is the first round at ``ref_batch`` (batch 1); speedups divide medians.
    """
    rs = runs[batch]
    sps = [x["sps"] for x in rs]
    r = rs[sps.index(statistics.median_low(sps))]
    ref_rs = runs[ref_batch]
    ref_sps = statistics.median_low([x["sps"] for x in ref_rs])
    first_ids = rs[0]["ids"]
    # None with one round: nothing was repeated, so nothing can be said about it
    same = sum(all(x["ids"].get(d) == v for x in rs[1:]) for d, v in first_ids.items()) / len(first_ids) if len(rs) > 1 else None
    return {
        "method": name,
        "stage": stage,
        "ratio": round(ratio, 6),
        "kept_tokens": n_vis if name == "none" else args.kept,
        "visual_tokens_kept_mean": r["kept_mean"],
        "visual_tokens_layer_mean": r["layer_mean"],
        "batch": r["batch"],
        "batch_setting": batch,
        "n_questions": n,
        "new_tokens": args.new_tokens,
        "samples_per_s": r["sps"],
        "eval_s": r["eval_s"],
        "samples_per_s_generate": n / r["generate_s"],
        "generate_s": r["generate_s"],
        "speedup_vs_b1": r["sps"] / ref_sps,
        **agreement(ref_rs[0], rs[0]),
        "distinct_outputs": len({tuple(v) for v in r["ids"].values()}),
        "peak_mem_gb": r["peak_mem_gb"],
        **env,
        "auto_batch": None if r["auto_batch"] is None else json.dumps({k: v for k, v in r["auto_batch"].items() if k != "rule"}, sort_keys=True),
        "inputs_s": r["phase_s"]["inputs"],
        "prepare_s": r["phase_s"]["prepare"],
        "llm_s": r["phase_s"]["generate"],
        "repeats": len(rs),
        "samples_per_s_min": min(sps),
        "samples_per_s_max": max(sps),
        "identical_rate_across_repeats": same,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1m": r["load"],
    }


def parse_batch(s: str):
    return "auto" if s == "auto" else int(s)


def sweep(args, model: str, weights: str, methods: list[str], batches: list, n_b1: int, n_batched: int, rows: list[dict], t_start: float,
          repeats: int) -> None:
    """Every method x batch size of one model; appends to ``rows`` and rewrites ``--out`` after each point."""
    from lmms_eval.tasks import TaskManager

    from bench.build import build_adapter, build_method, compose_config
    from bench.synthvqa.data import load_test
    from bench.tasks.synthvqa import prepare_task_dir

    n_max = max(n_b1, n_batched)
    base = [f"model={model}", f"model.weights={weights}", f"device={args.device}", "logger=none", *args.extra]
    t0 = time.time()
    adapter = build_adapter(compose_config(base)).load()
    processor = "checkpoint"
    if adapter.processor is None:
        adapter.processor = stand_in_processor(adapter.config)
        processor = "stand-in word-level (checkpoint tokenizer unavailable)"
    n_vis = adapter.grid[0] * adapter.grid[1]
    print(f"[tp] {model} ({weights} weights) on {adapter.device} {adapter.dtype}, built in {time.time() - t0:.1f} s", flush=True)
    docs = load_test(cache_dir=args.cache_dir, n=n_max)
    tm = TaskManager(include_path=str(prepare_task_dir(args.cache_dir, n=n_max)), include_defaults=False, verbosity="ERROR")
    dev = adapter.device
    env = {
        "model": model,
        "weights": weights,
        "processor": processor,
        "device": dev.type,
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "driver": driver_version() if dev.type == "cuda" else None,
        "cuda": torch.version.cuda if dev.type == "cuda" else None,
        "torch": torch.__version__,
        "transformers": ver("transformers"),
        "lmms_eval": ver("lmms_eval"),
        "datasets": ver("datasets"),
        "python": platform.python_version(),
        "dtype": str(adapter.dtype).replace("torch.", ""),
        "attn": adapter.attn_implementation,
    }
    first = True
    for name in methods:
        ratio = 0.0 if name == "none" else 1 - args.kept / n_vis
        cfg = compose_config([*base, f"method={name}", f"ratio={ratio}"])
        method = build_method(cfg)
        adapter.check_method(method)
        runs: dict[Any, list[dict[str, Any]]] = {b: [] for b in batches}
        n_rows = len(rows)
        for rnd in range(repeats):
            for batch in batches:
                n = n_b1 if batch == 1 else n_batched
                if first:  # dataset cache, kernels and allocator: nothing timed yet
                    evaluate(adapter, method, cfg, batch, min(n, 4), args.new_tokens, tm, docs)
                    first = False
                load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
                r = evaluate(adapter, method, cfg, batch, n, args.new_tokens, tm, docs)
                r["sps"], r["load"] = n / r["eval_s"], load
                runs[batch].append(r)
                # this method's rows from the rounds so far, rewritten after every point: a run cut
                # short keeps what it measured
                del rows[n_rows:]
                rows.extend(point_row(name, method.stage, ratio, args, n_vis, b, n_b1 if b == 1 else n_batched, runs, batches[0], env) for b in batches if runs[b])
                write_csv(rows, args.out, append_to=args.existing)
                row = next(x for x in rows[n_rows:] if x["batch_setting"] == batch)
                print(
                    f"[tp] {model} {name:>9} b={r['batch']:>2} ({batch}) round {rnd + 1}/{repeats}: {r['sps']:.2f} samples/s end-to-end "
                    f"(median so far {row['samples_per_s']:.2f}, x{row['speedup_vs_b1']:.2f} vs b1), "
                    f"identical vs b1 {row['identical_rate_vs_b1']:.4f} ({row['n_compared_vs_b1']} q) [{time.time() - t_start:.0f} s]",
                    flush=True,
                )
    del adapter
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "results/throughput_h100.csv")
    ap.add_argument("--model", default="llava15_7b")
    ap.add_argument("--weights", default="random", choices=["random", "pretrained"])
    ap.add_argument("--methods", nargs="*", default=["none", "divprune", "fastv"], help="none + pre-LLM + in-LLM by default")
    ap.add_argument("--kept", type=int, default=64, help="visual tokens kept (in-LLM: the mean over layers)")
    ap.add_argument("--batches", nargs="*", type=parse_batch, default=[1, 8, 16, "auto"], help="the first must be 1 (the identity reference)")
    ap.add_argument("--n-b1", type=int, default=100, help="questions at batch 1 (each round)")
    ap.add_argument("--n", type=int, default=320, help="questions at batch > 1, each round (the first --n-b1 are compared with batch 1)")
    ap.add_argument("--new-tokens", type=int, default=8, help="tokens generated per question (fixed)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds per method (rows report the median round)")
    ap.add_argument("--append", action="store_true", help="keep the rows already in --out and add these (e.g. one method per call)")
    ap.add_argument(
        "--identity-model", default="tiny_llava_synth",
        help="on CUDA, also run this trained model (same dtype rule: fp16) at batches 1/8/16 for an identity rate with real weights; '' to skip",
    )  # fmt: skip
    ap.add_argument("--identity-n", type=int, default=300, help="questions of the --identity-model pass (every batch size)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--cache-dir", default=None, help="SynthVQA data cache (default $BENCH_CACHE or ~/.cache/tokenprune-bench)")
    ap.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (--smoke: 1; several threads on a shared, busy CPU run ~10x slower)")
    ap.add_argument("--smoke", action="store_true", help="CPU check: embedded tiny model, 12 questions, batches 1, 4 and auto")
    if ap.parse_known_args(argv)[0].smoke:  # smoke defaults; explicit options still win
        ap.set_defaults(model="tiny_llava_synth", weights="pretrained", n_b1=12, n=12, new_tokens=4, batches=[1, 4, "auto"], device="cpu", threads=1, repeats=1)
    args = ap.parse_args(argv)
    if args.batches[0] != 1:
        ap.error("--batches must start with 1: batch 1 is the reference of the identity rate")
    if min(args.repeats, args.n_b1, args.n) < 1:
        ap.error("--repeats, --n-b1 and --n must be at least 1")
    args.existing = read_existing(args.out) if args.append and args.out.exists() else None
    if args.threads:
        torch.set_num_threads(args.threads)

    t_start = time.time()
    rows: list[dict] = []
    sweep(args, args.model, args.weights, args.methods, args.batches, args.n_b1, args.n, rows, t_start, args.repeats)
    on_cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    if args.identity_model and on_cuda and args.identity_model != args.model:
        # random weights have tiny logit margins, so fp16 noise flips more of their tokens than a
        # trained model's: the trained embedded model gives the identity rate with real answers (one
        # round: it is there for its answers, not its speed)
        sweep(args, args.identity_model, "pretrained", args.methods, [b for b in args.batches if b != "auto"], args.identity_n, args.identity_n, rows, t_start, 1)
    print(f"[tp] {len(rows)} rows -> {args.out} in {time.time() - t_start:.0f} s")
    return rows


if __name__ == "__main__":
    # nothing here needs the network (the GPU machine has none): never wait on hub retries
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    main()
