"""bench/measure/gpu_csv.py: the merge both GPU efficiency scripts use (keep the earlier rows not re-measured,
replace the re-measured ones, refuse another card with exit code 2 and nothing written) and the atomic rewrite."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

from bench.measure.gpu_csv import MixedDevicesError, device_tag, read_rows, replaced_atomically, rows_to_keep, write_rows

ROOT = Path(__file__).resolve().parent.parent
H100, H200 = "NVIDIA H100 80GB HBM3", "NVIDIA H200"
KEY = ["method", "budget", "batch"]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_keeps_rows_not_remeasured_and_replaces_remeasured_ones():
    old = [{"method": "a", "budget": "64", "batch": "1", "gpu": H100, "ms": "1.0"},
           {"method": "a", "budget": "128", "batch": "1", "gpu": H100, "ms": "2.0"},
           {"method": "b", "budget": "64", "batch": "16", "gpu": H100, "ms": "3.0"}]
    new = [{"method": "a", "budget": 128, "batch": 1, "gpu": H100, "ms": 9.0}]  # numbers against the CSV's text
    assert rows_to_keep(new, old, key=KEY, device="gpu") == [0, 2]
    assert rows_to_keep(new, old, key=KEY, device="gpu", drop=["b"]) == [0]  # stale rows of a dropped method go
    assert rows_to_keep([], old, key=KEY, device="gpu") == [0, 1, 2]  # nothing measured: everything kept
    # pandas' reading: floats for an integer column with blanks, NaN for a blank device
    nan = float("nan")
    pd_old = [{"method": "a", "budget": 128.0, "batch": 1, "gpu": nan}, {"method": "a", "budget": 64.0, "batch": 1, "gpu": H100}]
    assert rows_to_keep(new, pd_old, key=KEY, device="gpu") == [1]


def test_refuses_another_card_with_exit_code_2(capsys):
    old = [{"method": "a", "budget": "64", "batch": "1", "gpu": H100}]
    with pytest.raises(SystemExit) as e:
        rows_to_keep([{"method": "b", "budget": 64, "batch": 1, "gpu": H200}], old, key=KEY, device="gpu", source="--merge old.csv")
    assert isinstance(e.value, MixedDevicesError) and e.value.code == 2
    assert str(e.value) == capsys.readouterr().err.removeprefix("error: ").strip()
    assert "--merge old.csv" in str(e.value) and H100 in str(e.value) and H200 in str(e.value) and "separate CSV per GPU" in str(e.value)
    # an already mixed CSV is not merged into either
    mixed = old + [{"method": "c", "budget": "64", "batch": "1", "gpu": H200}]
    with pytest.raises(MixedDevicesError):
        rows_to_keep([{"method": "b", "budget": 64, "batch": 1, "gpu": H100}], mixed, key=KEY, device="gpu")


def test_family_efficiency_merge_keeps_replaces_and_refuses(tmp_path):
    fe = load("family_efficiency")
    base = {"model": "m", "family": "f", "device": H100, "image_h": 448, "image_w": 448, "batch": 1, "budget": ""}
    merge = tmp_path / "earlier.csv"
    fe.write_csv(merge, [{**base, "method": "none", "ratio": 0.0, "prefill_ms": 1.0},
                         {**base, "method": "random", "ratio": 0.5, "prefill_ms": 2.0},
                         {**base, "method": "random", "ratio": 0.889, "prefill_ms": 3.0}])
    before = merge.read_bytes()
    out = tmp_path / "out.csv"
    fe.write_csv(out, [{**base, "method": "random", "ratio": 0.5, "prefill_ms": 5.0}], merge)
    rows = read_rows(out)
    assert [(r["method"], r["ratio"], r["prefill_ms"]) for r in rows] == [("none", "0.0", "1.0"), ("random", "0.889", "3.0"), ("random", "0.5", "5.0")]
    with pytest.raises(SystemExit) as e:
        fe.write_csv(tmp_path / "mixed.csv", [{**base, "device": H200, "method": "random", "ratio": 0.5, "prefill_ms": 5.0}], merge)
    assert e.value.code == 2 and "separate CSV per GPU" in str(e.value)
    assert not (tmp_path / "mixed.csv").exists() and merge.read_bytes() == before


def test_leaderboard_merge_keeps_replaces_and_refuses(tmp_path):
    pd = pytest.importorskip("pandas")
    lb = load("efficiency_leaderboard")
    merge = tmp_path / "earlier.csv"
    pd.DataFrame([{"method": "a", "budget_requested": 64, "batch": 1, "gpu": H100, "prefill_graph_ms": 1.0},
                  {"method": "a", "budget_requested": 128, "batch": 1, "gpu": H100, "prefill_graph_ms": 2.0}]).to_csv(merge, index=False)
    before = merge.read_bytes()
    df = lb.write_table([{"method": "a", "budget_requested": 64, "batch": 1, "gpu": H100, "prefill_graph_ms": 7.0}], tmp_path / "out.csv", merge)
    assert df[["budget_requested", "prefill_graph_ms"]].values.tolist() == [[128, 2.0], [64, 7.0]]
    assert pd.read_csv(tmp_path / "out.csv").equals(df)
    with pytest.raises(SystemExit) as e:
        lb.write_table([{"method": "b", "budget_requested": 64, "batch": 1, "gpu": H200}], tmp_path / "mixed.csv", merge)
    assert e.value.code == 2
    assert not (tmp_path / "mixed.csv").exists() and merge.read_bytes() == before


def test_atomic_rewrite_leaves_the_old_file_on_error(tmp_path):
    path = tmp_path / "t.csv"
    write_rows(path, [{"a": 1, "b": 2}], ["a", "b"])
    with pytest.raises(RuntimeError), replaced_atomically(path) as tmp:
        tmp.write_text("half a tab")
        raise RuntimeError("cut short")
    assert list(csv.DictReader(open(path))) == [{"a": "1", "b": "2"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv"]  # no temporary file left behind
    write_rows(path, [{"a": 3, "c": 4}], ["a", "b"])  # missing cells empty, other keys left out
    assert read_rows(path) == [{"a": "3", "b": ""}]


@pytest.mark.parametrize("name,tag", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H100 PCIe", "h100"), ("NVIDIA H100 NVL", "h100"), ("NVIDIA H200", "h200"),
    ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA A100 80GB PCIe", "a100"), ("NVIDIA L40S", "l40s"), ("NVIDIA GeForce RTX 4090", "rtx4090"),
    ("NVIDIA GeForce RTX 3090 Ti", "rtx3090ti"), ("Tesla V100-SXM2-16GB", "v100"), ("Tesla T4", "t4"), ("NVIDIA A10G", "a10g"),
    ("NVIDIA RTX A6000", "a6000"), ("NVIDIA GH200 480GB", "gh200"), ("cpu", "cpu"), (" NVIDIA H200\n", "h200"),
])
def test_device_tag_of_real_card_names(name, tag):
    """Names as ``nvidia-smi --query-gpu=name`` and ``torch.cuda.get_device_name`` print them; the tags of the
    committed CSVs (``results/efficiency/*_h100.csv``) are unchanged."""
    assert device_tag(name) == tag


def test_device_tag_of_no_name_is_refused():
    with pytest.raises(ValueError, match="no device tag"):
        device_tag("NVIDIA ")


FAKE_SMI = '#!/bin/sh\ncase "$*" in *--query-gpu=name*) printf "NVIDIA H200\\nNVIDIA H200\\n";; *) exit 9;; esac\n'


@pytest.mark.parametrize("script", ["gpu_family_rows.sh"])
def test_the_gpu_scripts_take_their_tag_from_device_tag(script, tmp_path):
    """Each GPU script's ``tag=`` line, run as bash with a fake ``nvidia-smi`` on PATH and only the worktree on
    PYTHONPATH (the GPU machine has no lmms-eval), gives ``device_tag``'s answer for the first GPU."""
    import os
    import re
    import subprocess

    lines = [ln for ln in (ROOT / "benchmarks" / script).read_text().splitlines() if re.match(r"\s*tag=", ln)]
    assert len(lines) == 1 and "bench.measure.gpu_csv" in lines[0]
    (tmp_path / "nvidia-smi").write_text(FAKE_SMI)
    (tmp_path / "nvidia-smi").chmod(0o755)
    # python3 is the test's interpreter (its venv's bin first on PATH)
    env = {**os.environ, "PATH": f"{tmp_path}:{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(["bash", "-c", f"set -uo pipefail\n{lines[0]}\necho \"$tag\""], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == device_tag("NVIDIA H200") == "h200"


def test_the_tag_entry_point_imports_nothing_heavy():
    """``python3 -m bench.measure.gpu_csv`` and importing the module load no torch, pandas, hydra or lmms-eval; bad
    use exits 2."""
    import subprocess

    code = ("import sys, bench.measure.gpu_csv as g; g.main(['NVIDIA L40S']); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'pandas', 'hydra', 'lmms_eval', 'transformers'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.split() == ["l40s", "[]"], out.stderr
    bad = subprocess.run([sys.executable, "-m", "bench.measure.gpu_csv", "a", "b"], cwd=ROOT, env={"PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "usage" in bad.stderr
    none = subprocess.run([sys.executable, "-m", "bench.measure.gpu_csv"], cwd=ROOT, env={"PATH": "/nonexistent", "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
    assert none.returncode == 2 and "no GPU tag" in none.stderr and none.stdout == ""
