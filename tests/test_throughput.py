"""benchmarks/bench_throughput.py: the stand-in processor of random-weight LLaVA-1.5-7B, and a CPU
smoke run of the whole script (lmms-eval -> project model -> pruning -> generate at several batch
sizes, identity against batch 1)."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_script():
    spec = importlib.util.spec_from_file_location("bench_throughput", ROOT / "benchmarks" / "bench_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_stand_in_processor_matches_llava15_7b_ids(tmp_path):
    from transformers import LlavaConfig

    from bench.models.llava import chat_prompt
    from bench.synthvqa.data import load_test

    cfg = LlavaConfig(**json.loads((ROOT / "bench/assets/configs/llava-1.5-7b-hf.json").read_text()))
    proc = load_script().stand_in_processor(cfg)
    tok = proc.tokenizer
    assert len(tok) == cfg.text_config.vocab_size == 32064
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (32001, 1, 2)
    assert tok.convert_tokens_to_ids("<image>") == cfg.image_token_index == 32000
    doc = load_test(cache_dir=tmp_path, n=2)[1]
    prompt = chat_prompt(proc, doc["question"] + "\nAnswer the question using a single word.")
    batch = proc(images=[doc["image"]], text=[prompt], return_tensors="pt")
    ids = batch["input_ids"][0]
    assert int((ids == 32000).sum()) == 576 and tuple(batch["pixel_values"].shape) == (1, 3, 336, 336)
    assert int((ids == tok.unk_token_id).sum()) == 0, "every prompt word is in the stand-in vocabulary"
    # every generated id decodes to its own word: equal texts mean equal ids
    a, b = tok.decode([100, 200, 31999]), tok.decode([100, 201, 31999])
    assert a != b and len(a.split()) == 3


@pytest.mark.slow
def test_smoke_run_writes_identical_batched_predictions(tmp_path):
    out = tmp_path / "throughput.csv"
    # one pre-LLM and one in-LLM method; `auto` resolves to AUTO_CPU_BATCH on CPU
    rows = load_script().main(["--smoke", "--methods", "divprune", "fastv", "--batches", "1", "4", "auto", "--n-b1", "8", "--n", "8", "--out", str(out), "--cache-dir", str(tmp_path)])
    with open(out) as fh:
        got = list(csv.DictReader(fh))
    assert len(got) == len(rows) == 6
    assert [(r["method"], r["batch_setting"]) for r in got] == [(m, b) for m in ("divprune", "fastv") for b in ("1", "4", "auto")]
    for r in got:
        assert float(r["samples_per_s"]) > 0 and float(r["samples_per_s_generate"]) >= float(r["samples_per_s"])
        assert int(r["n_questions"]) == int(r["n_compared_vs_b1"]) == 8 and int(r["new_tokens"]) == 4
        # fp32 on CPU: batching must not change a single generated token
        assert float(r["identical_rate_vs_b1"]) == 1.0 and float(r["identical_text_rate_vs_b1"]) == 1.0
        assert r["torch"] and r["transformers"] and r["lmms_eval"] and r["dtype"] == "float32"
    auto = [r for r in got if r["batch_setting"] == "auto"]
    assert all(int(r["batch"]) == 16 and json.loads(r["auto_batch"])["batch_size"] == 16 for r in auto)
    div = [r for r in got if r["method"] == "divprune"]
    assert all(float(r["visual_tokens_kept_mean"]) == 64 for r in div)


@pytest.mark.slow
def test_repeats_report_the_median_round_and_append_keeps_rows(tmp_path):
    out = tmp_path / "throughput.csv"
    common = ["--smoke", "--batches", "1", "4", "--n-b1", "6", "--n", "6", "--out", str(out), "--cache-dir", str(tmp_path)]
    script = load_script()
    script.main([*common, "--methods", "divprune", "--repeats", "3"])
    with open(out) as fh:
        first = list(csv.DictReader(fh))
    assert [(r["method"], r["batch"], r["repeats"]) for r in first] == [("divprune", "1", "3"), ("divprune", "4", "3")]
    for r in first:
        lo, mid, hi = (float(r[k]) for k in ("samples_per_s_min", "samples_per_s", "samples_per_s_max"))
        assert 0 < lo <= mid <= hi
        # the reported round is one of the three: its own time gives its rate
        assert float(r["samples_per_s"]) == pytest.approx(int(r["n_questions"]) / float(r["eval_s"]), rel=1e-3)
        assert float(r["identical_rate_across_repeats"]) == 1.0  # fp32 CPU: every round the same ids
        assert int(r["cpu_count"]) >= 1 and int(r["torch_threads"]) == 1
    b1, b4 = (float(r["samples_per_s"]) for r in first)
    assert float(first[1]["speedup_vs_b1"]) == pytest.approx(b4 / b1, rel=1e-3)

    script.main([*common, "--methods", "fastv", "--append"])  # one round: no repeat identity to report
    with open(out) as fh:
        both = list(csv.DictReader(fh))
    assert both[:2] == first, "--append keeps the rows already there, as they were"
    assert [(r["method"], r["repeats"], r["identical_rate_across_repeats"]) for r in both[2:]] == [("fastv", "1", ""), ("fastv", "1", "")]

    old = tmp_path / "old.csv"
    old.write_text("method,batch\nfastv,1\n")
    with pytest.raises(SystemExit, match="other columns"):
        script.main([*common[:-4], "--out", str(old), "--cache-dir", str(tmp_path), "--methods", "fastv", "--append"])
    assert old.read_text() == "method,batch\nfastv,1\n"


@pytest.mark.slow
def test_gpu_path_on_a_shrunken_llava15_7b_config(tmp_path):
    """The GPU run's path (llava15_7b, random weights, no checkpoint processor -> stand-in) with
    LLaVA-1.5-7B's config shrunk in width and depth: same vocabulary, special ids and 576 tokens."""
    cfg = json.loads((ROOT / "bench/assets/configs/llava-1.5-7b-hf.json").read_text())
    cfg["text_config"].update(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2)
    cfg["vision_config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, projection_dim=32)
    (tmp_path / "shrunk.json").write_text(json.dumps(cfg))
    out = tmp_path / "throughput.csv"
    args = ["--smoke", "--model", "llava15_7b", "--weights", "random", "--extra", f"model.config_file={tmp_path / 'shrunk.json'}"]
    rows = load_script().main([*args, "--methods", "none", "divprune", "--batches", "1", "4", "--n-b1", "6", "--n", "6", "--out", str(out), "--cache-dir", str(tmp_path)])
    assert [(r["method"], r["batch"]) for r in rows] == [("none", 1), ("none", 4), ("divprune", 1), ("divprune", 4)]
    for r in rows:
        assert r["weights"] == "random" and r["processor"].startswith("stand-in")
        assert r["n_compared_vs_b1"] == 6 and 0.0 <= r["identical_rate_vs_b1"] <= 1.0
        # answers differ between questions: the generations depend on the inputs
        assert r["distinct_outputs"] > 1
    assert [r["visual_tokens_kept_mean"] for r in rows] == [576, 576, 64, 64]


def test_efficiency_merge_refuses_another_card(tmp_path):
    """Rows timed on one kind of GPU are never merged into a CSV timed on another: the merge stops."""
    import importlib.util

    import pandas as pd

    spec = importlib.util.spec_from_file_location("eff_lb", Path(__file__).resolve().parent.parent / "benchmarks" / "efficiency_leaderboard.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    old = tmp_path / "old.csv"
    pd.DataFrame([{"method": "a", "budget_requested": 64, "batch": 1, "gpu": "NVIDIA H100 80GB HBM3", "prefill_graph_ms": 1.0}]).to_csv(old, index=False)
    same = mod.write_table([{"method": "b", "budget_requested": 64, "batch": 1, "gpu": "NVIDIA H100 80GB HBM3", "prefill_graph_ms": 2.0}], tmp_path / "same.csv", old)
    assert sorted(same["method"]) == ["a", "b"]
    with pytest.raises(SystemExit, match="separate CSV per GPU"):
        mod.write_table([{"method": "b", "budget_requested": 64, "batch": 1, "gpu": "NVIDIA H200", "prefill_graph_ms": 2.0}], tmp_path / "mixed.csv", old)
    assert not (tmp_path / "mixed.csv").exists()
