"""benchmarks/family_efficiency.py: the ``--tiny`` smoke mode on CPU runs the GPU script's code end to end on
tiny random-config LLaVA-NeXT and Qwen2.5-VL models, writes one CSV per family with the roofline columns,
and its analytic LLM FLOPs equal ``FlopCounterMode``'s count of the same prefill (grouped-query K/V)."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def load_script():
    spec = importlib.util.spec_from_file_location("family_efficiency", ROOT / "benchmarks" / "family_efficiency.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def fe():
    return load_script()


@pytest.mark.integration
def test_tiny_mode_writes_one_csv_per_family(fe, tmp_path):
    paths = fe.main(["--tiny", "--device", "cpu", "--dtype", "float32", "--ratios", "0.5", "0.889", "--out", str(tmp_path)])
    assert sorted(p.name for p in paths) == ["tiny_llava_next_random_cpu.csv", "tiny_qwen25vl_random_cpu.csv"]
    for p in paths:
        rows = list(csv.DictReader(open(p)))
        assert {"llm_prefill_floor_ms", "matmul_tflops_per_s", "copy_gb_per_s", "llm_prefill_flops_analytic", "prefill_ms"} <= set(rows[0])
        # no ceiling is measured on CPU: the floor is empty (null), never a made-up number
        assert all(r["llm_prefill_floor_ms"] == "" and r["timer"] == "wall_clock" for r in rows)
        model = rows[0]["model"]
        sizes = {(int(r["image_h"]), int(r["image_w"])) for r in rows}
        assert sizes == set(fe.SIZES[model])
        assert len(rows) == len(sizes) * (1 + 2 * 2)  # none + (random, divprune) x 2 ratios per size
        for r in rows:
            n_in, kept, seq = int(r["visual_tokens_in"]), int(r["visual_tokens_kept"]), int(r["seq_len"])
            assert float(r["prefill_ms"]) > 0 and int(r["kv_cache_bytes"]) > 0
            if r["method"] == "none":
                assert kept == n_in
            else:
                assert kept < n_in
        none = {(r["image_h"], r["image_w"]): r for r in rows if r["method"] == "none"}
        if model == "tiny_llava_next_random":
            # 112 x 112 on 56 px tiles of 4 x 4: base 16 + 8 x 8 anyres + 8 newlines
            assert int(none[("112", "112")]["visual_tokens_in"]) == 16 + 64 + 8
            assert int(none[("112", "112")]["newline_tokens"]) == 8
        else:
            # merged 2 x 2 tokens of 14 px patches: (H / 28) x (W / 28)
            assert int(none[("112", "84")]["visual_tokens_in"]) == 4 * 3
            assert int(none[("56", "56")]["visual_tokens_in"]) == 4


@pytest.mark.parametrize("model,size", [("tiny_llava_next_random", (100, 60)), ("tiny_qwen25vl_random", (112, 84))])
@pytest.mark.parametrize("batch", [1, 2])
def test_analytic_llm_flops_equal_the_counter(fe, model, size, batch):
    from bench.measure.flops import count_flops, llm_prefill_flops
    from methods.registry import create

    adapter = fe.build(model, "cpu", "float32")
    desc = adapter.flops_description()
    assert desc.llm_kv_heads < desc.llm_heads  # grouped-query attention is exercised
    prepared = adapter.prepare(adapter.probe_batch(batch_size=batch, size=size), create("divprune", 0.5), torch.arange(batch))
    counted, _ = count_flops(lambda: adapter.prefill(prepared))
    assert counted == llm_prefill_flops(desc, int(prepared.attention_mask.shape[1]), batch)


def test_bad_arguments_exit_2(fe, tmp_path):
    with pytest.raises(SystemExit) as e:
        fe.main(["--models", "no_such_model", "--device", "cpu", "--out", str(tmp_path)])
    assert e.value.code == 2
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as e:
            fe.main(["--tiny", "--out", str(tmp_path)])
        assert e.value.code == 2
    assert not any(tmp_path.iterdir())


def test_merge_dir_of_another_card_exits_2_and_writes_nothing(fe, tmp_path):
    """``--merge-dir`` holding this model's CSV from another kind of card: refused (exit 2) at the first row,
    that CSV untouched, no CSV written under ``--out``."""
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    old = earlier / "tiny_qwen25vl_random_cpu.csv"
    old.write_text("model,device,image_h,image_w,method,ratio,batch,budget,prefill_ms\n"
                   "tiny_qwen25vl_random,NVIDIA H100 80GB HBM3,56,56,random,0.5,1,,1.0\n")
    before = old.read_bytes()
    with pytest.raises(SystemExit) as e:
        fe.main(["--tiny", "--device", "cpu", "--dtype", "float32", "--models", "tiny_qwen25vl_random", "--methods", "none",
                 "--merge-dir", str(earlier), "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and "NVIDIA H100 80GB HBM3" in str(e.value)
    assert old.read_bytes() == before and not any((tmp_path / "out").iterdir())
