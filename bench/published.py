"""Published numbers beside measured ones: ``bench/reference/*.csv`` (data, with their sources) joined with
the leaderboard wherever both have the same model, method, budget and benchmark.

Every reference file has the columns ``source, model, method, visual_tokens, benchmark, score, note``: one
published score (in the paper's units: percent, MME as perception + cognition) of a method run by its
authors' configuration for a budget of ``visual_tokens``. Published tables label a configuration by the
budget it was asked for (DART's "192" keeps 196 tokens, SparseVLM's "192" averages 206.5), so a measured
row is matched by the budget it asked for (``budget_requested``) and only where it ran the same kind of
configuration: the official schedule (``budget_mode`` ``official``) or an exact pre-LLM / in-tower budget.
The comparison keeps ``budget_mode``, ``budget_met`` and the measured ``visual_tokens`` beside the gap, so a
row whose count differs from its label says so. ``aggregate`` writes it per model
(``tables/<model>_vs_reported.{csv,md}``).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

REFERENCE = Path(__file__).resolve().parent / "reference"
#: budget modes whose runs are the configurations published tables report
COMPARABLE_MODES = ("official", "pre_llm_exact", "in_vision_exact")
COLUMNS = ["model", "method", "budget", "benchmark", "measured", "reported", "gap", "source", "budget_mode", "budget_met", "visual_tokens", "run_id"]


def load_reference(directory: Path = REFERENCE) -> pd.DataFrame:
    """Every ``*.csv`` under ``directory``, one frame (``visual_tokens`` as int)."""
    frames = [pd.read_csv(p) for p in sorted(Path(directory).glob("*.csv"))]
    if not frames:
        return pd.DataFrame(columns=["source", "model", "method", "visual_tokens", "benchmark", "score", "note"])
    ref = pd.concat(frames, ignore_index=True)
    ref["visual_tokens"] = ref["visual_tokens"].astype(int)
    return ref


def compare(df: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """Measured vs published scores of a leaderboard (``aggregate.leaderboard_full``: needs ``report_scale``).

    Rows without ``budget_requested`` (records older than the budget fields) are matched by their measured
    visual tokens, as before those fields existed.
    """
    m = df[df["score"].notna()].copy()
    if m.empty or reference.empty:
        return pd.DataFrame(columns=COLUMNS)
    if "budget_requested" not in m:
        m["budget_requested"] = None
    if "budget_mode" not in m:
        m["budget_mode"] = "unrecorded"
    if "budget_met" not in m:
        m["budget_met"] = None
    legacy = m["budget_requested"].isna()
    m = m[legacy | m["budget_mode"].isin(COMPARABLE_MODES)].copy()
    m["budget_key"] = m["budget_requested"].where(~legacy, m["visual_tokens"].round()).astype("Int64")
    m["measured"] = (m["score"] * m["report_scale"]).round(3)
    ref = reference.rename(columns={"score": "reported", "visual_tokens": "budget_key"})[["source", "model", "method", "budget_key", "benchmark", "reported"]]
    ref["budget_key"] = ref["budget_key"].astype("Int64")
    j = m.merge(ref, on=["model", "method", "budget_key", "benchmark"], how="inner")
    j["gap"] = (j["measured"] - j["reported"]).round(3)
    j = j.rename(columns={"budget_key": "budget_asked"})
    j["budget"] = j["budget_asked"]
    return j[COLUMNS].sort_values(["model", "benchmark", "budget", "method", "source"], ascending=[True, True, False, True, True]).reset_index(drop=True)


def markdown(gap: pd.DataFrame, model: str) -> str:
    """The comparison of one model as a markdown table."""
    lines = [f"# {model}: measured vs published", "",
             "Published scores (bench/reference, with their sources) beside this harness's runs of the same configuration: the "
             "method's official schedule (or an exact pre-LLM budget) for the same budget. `tokens` is what the run measured "
             "(the layer mean for in-LLM methods); `met` says whether that is the budget the row is labelled with.", "",
             "| Budget | Method | Benchmark | Measured | Published | Gap | Source | Mode | Met | Tokens |", "|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in gap.iterrows():
        met = "" if pd.isna(r["budget_met"]) else ("yes" if r["budget_met"] else "no")
        lines.append(f"| {r['budget']} | {r['method']} | {r['benchmark']} | {r['measured']:g} | {r['reported']:g} | {r['gap']:+g} | {r['source']} | {r['budget_mode']} | {met} | {r['visual_tokens']} |")
    return "\n".join(lines) + "\n"
