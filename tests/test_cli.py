"""Bad input: a clear message, exit code 2, and nothing written under results/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def bench(*args: str, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def nothing_written(results: Path) -> bool:
    return not results.exists() or not any(results.rglob("*"))


def test_help_and_list():
    r = bench("--help")
    assert r.returncode == 0 and "run" in r.stdout and "aggregate" in r.stdout
    r = bench("list")
    assert r.returncode == 0
    for name in ("none", "random", "pool", "tiny_llava_synth", "llava15_7b", "synthvqa", "gqa"):
        assert name in r.stdout


@pytest.mark.integration
def test_a_new_method_is_two_files(tmp_path):
    """Adding methods/x.py + conf/method/x.yaml is all it takes to appear in `list` and pass validation;
    a near miss gets a suggestion."""
    py = ROOT / "methods" / "zz_probe_tmp.py"
    f = ROOT / "conf" / "method" / "zz_probe_tmp.yaml"
    py.write_text("from dataclasses import dataclass\n\nfrom methods.random import RandomPruning\n\n\n@dataclass\nclass Probe(RandomPruning):\n    pass\n")
    f.write_text("# probe method for a test\nname: zz_probe_tmp\n_target_: methods.zz_probe_tmp.Probe\nprune_ratio: ${ratio}\nseed: ${seed}\n")
    try:
        assert "zz_probe_tmp" in bench("list", "methods").stdout
        r = bench("run", "method=zz_probe_tmpp", f"results_dir={tmp_path / 'results'}")
        assert r.returncode == 2 and "did you mean 'zz_probe_tmp'?" in r.stderr, r.stderr
        r = subprocess.run([sys.executable, "-c", "from methods import registry; m = registry.create('zz_probe_tmp', 0.5); print(m.name)"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.stdout.strip() == "zz_probe_tmp", r.stderr
    finally:
        f.unlink()
        py.unlink()


@pytest.mark.parametrize(
    "override,needle",
    [
        ("method=nope", "Valid methods:"),
        ("method=divprun", "unknown method 'divprun' (did you mean 'divprune'?)"),
        ("model=gpt5", "Valid models:"),
        ("benchmark=imagenet", "Valid benchmarks:"),
        ("ratio=1.0", "ratio must be in [0, 1)"),
        ("ratio=-0.1", "ratio must be in [0, 1)"),
        ("ratio=abc", "ratio must be a number"),
    ],
)
@pytest.mark.integration
def test_bad_names_and_ratios_exit_2(tmp_path, override, needle):
    results = tmp_path / "results"
    r = bench("run", override, f"results_dir={results}")
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr
    assert nothing_written(results)


@pytest.mark.integration
def test_sweep_with_one_bad_value_exits_2_before_running(tmp_path):
    results = tmp_path / "results"
    r = bench("run", "-m", "method=random,bogus", "ratio=0.5", f"results_dir={results}")
    assert r.returncode == 2 and "bogus" in r.stderr
    assert nothing_written(results)


@pytest.mark.integration
def test_none_with_ratio_exits_2(tmp_path):
    results = tmp_path / "results"
    r = bench("run", "method=none", "ratio=0.5", f"results_dir={results}")
    assert r.returncode == 2 and "only runs at ratio=0" in r.stderr
    assert nothing_written(results)


@pytest.mark.integration
def test_missing_weights_exit_2_with_instructions(tmp_path):
    results = tmp_path / "results"
    r = bench("run", "model=llava15_7b", "method=random", "ratio=0.5", f"results_dir={results}", "device=cpu")
    assert r.returncode == 2, r.stderr
    assert "hf download llava-hf/llava-1.5-7b-hf" in r.stderr and "model.weights=random" in r.stderr
    assert nothing_written(results)
    r = bench("run", f"model.source={tmp_path / 'no-such-dir'}", f"results_dir={results}")
    assert r.returncode == 2 and "no weights at" in r.stderr
    assert nothing_written(results)


@pytest.mark.integration
def test_corrupt_weights_exit_2(tmp_path, tiny_model_dir):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\x00garbage, not a safetensors file")
    results = tmp_path / "results"
    r = bench("run", f"model.source={broken}", "model.sha256=null", f"results_dir={results}")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "cannot read the weights" in r.stderr
    assert nothing_written(results)


def test_aggregate_without_records_exits_2(tmp_path):
    r = bench("aggregate", "--results-dir", str(tmp_path / "empty"))
    assert r.returncode == 2 and "no run records" in r.stderr


def test_unknown_command_exits_2():
    r = bench("frobnicate")
    assert r.returncode == 2 and "unknown command" in r.stderr


def test_local_sweep_refreshes_leaderboard_once_at_its_end(monkeypatch, tmp_path):
    """Runs of a local sweep defer the refresh (execute(refresh=False) returns the pending results dir);
    cmd_run then rebuilds each results dir once, and nothing when no run was executed (e.g. every
    combination refused)."""
    import bench.aggregate as aggregate
    import bench.cli as cli
    from bench.runner import RunResult

    calls = []
    monkeypatch.setattr(aggregate, "refresh_leaderboard", lambda d: calls.append(d))
    session = cli.Session()
    session.refresh_pending()
    assert calls == []
    for d in ("b", "a", "b"):
        session.add(RunResult({"run_id": d}, refresh_pending=str(tmp_path / d)))
    session.add(RunResult({"run_id": "c"}))  # refreshed by execute itself
    session.add(RunResult({"run_id": "d"}, verify={"reproduced": False, "mismatch": "d: 1 of 6 answers differ"}))
    session.refresh_pending()
    assert calls == [str(tmp_path / "a"), str(tmp_path / "b")] and not session.pending
    assert session.mismatches == ["d: 1 of 6 answers differ"]


def _tree(results: Path) -> dict[str, bytes]:
    return {str(p.relative_to(results)): p.read_bytes() for p in sorted(results.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_verify_reanswers_a_record_and_catches_a_changed_answer(tmp_path):
    """verify=true: the model answers again; identical -> exit 0, a changed answer -> exit 3, nothing written."""
    results = tmp_path / "results"
    args = ("run", "benchmark.limit=6", "logger=none", "measure.efficiency=false", f"results_dir={results}")
    r = bench(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    (run,) = (results / "runs").iterdir()
    before = _tree(results)

    r = bench(*args, "verify=true")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"verify {run.name}" in r.stdout and "reproduced: 6/6 answers identical" in r.stdout
    assert _tree(results) == before, "verify writes nothing"

    # a record whose answer was changed by hand (or by a regression of the harness) is caught
    lines = (run / "samples.jsonl").read_text().splitlines()
    import json

    row = json.loads(lines[2])
    row["prediction"] = "not-" + str(row["prediction"])
    (run / "samples.jsonl").write_text("\n".join([*lines[:2], json.dumps(row), *lines[3:]]) + "\n")
    tampered = _tree(results)
    r = bench(*args, "verify=true")
    assert r.returncode == 3, r.stderr[-2000:]
    assert "NOT reproduced: 1 of 6 answers differ (documents 2)" in r.stdout and "not reproduced" in r.stderr
    # the record names this CPU, so the difference is not another machine's float rounding
    assert "recorded on this CPU" in r.stdout and "the difference is not the machine" in r.stdout
    assert _tree(results) == tampered, "a failed verification leaves the record as it was"

    (run / "samples.jsonl").unlink()
    r = bench(*args, "verify=true")
    assert r.returncode == 2 and "samples.jsonl is missing" in r.stderr

    # verify is not part of the run's identity, and a run without a record simply runs
    r = bench(*args[:-1], f"results_dir={tmp_path / 'other'}", "verify=true")
    assert r.returncode == 0 and (tmp_path / "other" / "runs" / run.name / "record.json").exists()


def test_cpu_difference_tells_another_cpu_from_this_one():
    """Only CPU records that name their CPU are compared; another CPU's rounding is named as a possible cause."""
    from types import SimpleNamespace

    from bench import environment
    from bench.verify import cpu_difference

    here = environment.cpu()
    assert " / " in here and here.split(" / ")[0]
    cpu_adapter = SimpleNamespace(device="cpu")
    rec = {"efficiency": {"device": "cpu"}, "provenance": {"cpu": here}}
    assert cpu_difference(rec, cpu_adapter) is False
    assert cpu_difference({**rec, "provenance": {"cpu": "Some Other CPU / AVX2"}}, cpu_adapter) is True
    assert cpu_difference({**rec, "provenance": {}}, cpu_adapter) is None  # older records name no CPU
    assert cpu_difference({"efficiency": {"device": "cuda"}, "provenance": {"cpu": "x"}}, cpu_adapter) is None


@pytest.mark.integration
def test_unreachable_in_llm_budget_exits_2_before_model_work(tmp_path):
    """TransPrune cannot bring the layer mean of LLaVA-1.5-7B's 32 layers down to 64 (its first pruning layer
    is 7: 126.8 at best): refused with the reason, before the 7B model is built, nothing written."""
    results = tmp_path / "results"
    r = bench("run", "model=llava15_7b", "model.weights=random", "method=transprune", "ratio=0.888889", "device=cpu", f"results_dir={results}")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "cannot reach 64 visual tokens" in r.stderr and "126.78" in r.stderr
    assert nothing_written(results)
