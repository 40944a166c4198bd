"""Batched evaluation gives the same answers: predictions at batch 8 equal batch 1 (CPU, fp32),
and every method at ratio 0 gives exactly the unpruned predictions.

Runs the project's lmms-eval model (`TokenPruneLlava.generate_until`: length-grouped batches, left
padding, per-sample pruning) on SynthVQA test questions with the embedded default model, for every
method at ratios 0, 0.5 and 0.9.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.errors import BenchError

CONF = Path(__file__).resolve().parent.parent / "conf"
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
N_DOCS = 48  # six batches of 8 of mixed prompt lengths


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from bench.models.llava import ASSETS, LlavaAdapter
    from bench.synthvqa.data import load_test

    src = ASSETS / "tiny-llava-synth"
    if not (src / "config.json").exists():
        pytest.fail(f"the embedded model is missing at {src}")
    adapter = LlavaAdapter("tiny_llava_synth", str(src), device="cpu").load()
    docs = load_test(cache_dir=tmp_path_factory.mktemp("synth"))[:N_DOCS]
    return adapter, docs


def requests(docs):
    from lmms_eval.api.instance import Instance

    from bench.tasks.synthvqa.task_utils import synthvqa_doc_to_text, synthvqa_doc_to_visual

    kw = {"post_prompt": "\nAnswer the question using a single word."}
    return [
        Instance("generate_until", (synthvqa_doc_to_text(d, kw), {"max_new_tokens": 8, "until": ["\n\n"]}, synthvqa_doc_to_visual, i, "synthvqa", "test"), idx=0, metadata={"task": "synthvqa", "doc_id": i, "repeats": 1})
        for i, d in enumerate(docs)
    ]


def predictions(adapter, method, docs, batch_size):
    from bench.lmms_model import TokenPruneLlava

    lm = TokenPruneLlava(adapter=adapter, method=method, batch_size=batch_size, seed=0)
    lm.task_dict = {"synthvqa": {"test": docs}}
    return lm.generate_until(requests(docs)), lm.stats


def build(name, ratio):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"method={name}", f"ratio={ratio}"])
    return instantiate({k: v for k, v in cfg.method.items() if k != "name"})


CASES = [(m, r) for m in METHODS for r in (0.0, 0.5, 0.9) if not (m == "none" and r)]
_UNPRUNED: dict[str, list[str]] = {}


@pytest.mark.slow
@pytest.mark.parametrize("name,ratio", CASES)
def test_batch8_equals_batch1(setup, name, ratio):
    adapter, docs = setup
    torch.manual_seed(0)
    method = build(name, ratio)
    try:
        adapter.check_method(method)
        one, stats1 = predictions(adapter, method, docs, 1)
    except BenchError as e:  # e.g. ToMe cannot reach 10% in the tiny tower's few blocks
        pytest.skip(f"{name} at ratio {ratio} refuses this model: {e}")
    eight, stats8 = predictions(adapter, method, docs, 8)
    assert len(one) == len(eight) == N_DOCS
    same = sum(a == b for a, b in zip(one, eight))
    assert same == N_DOCS, f"{N_DOCS - same} of {N_DOCS} predictions differ between batch 1 and 8"
    kept1 = {s["doc_id"]: s["visual_tokens_kept"] for s in stats1}
    kept8 = {s["doc_id"]: s["visual_tokens_kept"] for s in stats8}
    assert kept1 == kept8
    if ratio == 0.0:
        # ratio 0 reproduces the unpruned model exactly, whatever the method
        if "ref" not in _UNPRUNED:
            _UNPRUNED["ref"] = predictions(adapter, build("none", 0.0), docs, 8)[0]
        assert eight == _UNPRUNED["ref"], f"{name} at ratio 0 changes predictions"
