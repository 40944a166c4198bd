# One-off (deleted in the next commit; `git show <this commit>:benchmarks/rederive_stale_efficiency_rows.py`).
"""Check, then fix, the stale analytic columns of results/efficiency/llava15_7b_h100.csv (rows measured before the
papers'-convention fix): tflops_paper_convention must be the current bench.measure.flops.paper_convention of the row's
own visual tokens at the script's 60 text tokens; budget_mode is the method's own (pre-LLM / in-vision: exact)."""
import csv, json, sys
from types import SimpleNamespace
sys.path.insert(0, ".")
from bench.measure.flops import paper_convention
from transformers import LlavaConfig
from bench.build import build_method, compose_config

cfg = LlavaConfig.from_dict(json.load(open("bench/assets/configs/llava-1.5-7b-hf.json")))
path = "results/efficiency/llava15_7b_h100.csv"
rows = list(csv.DictReader(open(path)))
fields = list(rows[0].keys())
n_fixed = 0
for r in rows:
    if r["paper_convention_text_tokens"]:
        # a current row: the formula must reproduce it (the check of the check)
        if r["visual_tokens"] == r["visual_tokens_layer_mean"]:
            v = paper_convention(cfg, int(float(r["paper_convention_text_tokens"])), [int(float(r["visual_tokens"]))] * 32) / 1e12
            assert repr(v) == r["tflops_paper_convention"] or abs(v - float(r["tflops_paper_convention"])) < 1e-12, (r["method"], v, r["tflops_paper_convention"])
        continue
    k = int(float(r["visual_tokens"]))
    assert float(r["visual_tokens_layer_mean"]) == k, r
    new = paper_convention(cfg, 60, [k] * 32) / 1e12
    old = float(r["tflops_paper_convention"])
    assert abs(old / 2 - new) < 1e-12, (r["method"], r["batch"], old, new)  # the only change was the factor 2
    r["tflops_paper_convention"] = repr(new)
    r["paper_convention_text_tokens"] = "60.0"
    req = int(r["budget_requested"])
    ratio = 0.0 if r["method"] == "none" else 1 - req / 576  # as efficiency_leaderboard.py composes the run
    method = build_method(compose_config([f"model=llava15_7b", "model.weights=random", "measure=efficiency", f"method={r['method']}", f"ratio={ratio}"]))
    b = method.budget_fields(576, 32, float(r["visual_tokens"]), None)  # the runner's own budget keys
    assert b["budget_tokens"] == req, (r["method"], b)
    r["budget_mode"], r["budget_measure"] = b["budget_mode"], b["budget_measure"]
    r["budget_measured"], r["budget_met"] = repr(float(b["budget_measured"])), str(b["budget_met"])
    r["budget"] = repr(float(req)) if b["budget_met"] else repr(float(b["budget_measured"]))
    n_fixed += 1
print("fixed", n_fixed)
for r in rows:
    if r["budget_met"] == "False": print("not met:", r["method"], r["batch"], r["budget_requested"], r["visual_tokens"], r["budget"], r["budget_mode"])
if "--write" in sys.argv:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
        w.writeheader(); w.writerows(rows)
