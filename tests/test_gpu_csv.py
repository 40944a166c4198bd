"""bench/measure/gpu_csv.py: the merge both GPU efficiency scripts use (keep the earlier rows not re-measured,
replace the re-measured ones, refuse another card with exit code 2 and nothing written) and the atomic rewrite."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

from bench.measure.gpu_csv import MixedDevicesError, read_rows, replaced_atomically, rows_to_keep, write_rows

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
