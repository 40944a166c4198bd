"""``generate`` with every in-LLM method on the embedded trained tiny model, on the locked stack.

Each in-LLM method prunes at prefill and then decodes from its pruned KV cache; a transformers release
that renames the cache argument (5.25 passes ``cache=`` instead of ``past_key_values=``) makes every
call look like a prefill and crashes the first decode step. Here each method generates several tokens
at batch 1 and at batch 4, and every sample's tokens must be the same at both batch sizes.
"""

from __future__ import annotations

import pytest
import torch

from methods import registry

#: every registered method that prunes inside the LLM (a new one joins by its two files)
IN_LLM = [e.name for e in registry.entries().values() if e.cls.stage == "in_llm"]
STEPS = 5


@pytest.fixture(scope="module")
def tiny():
    from bench.models.llava import LlavaAdapter
    from bench.synthvqa.data import load_test
    from bench.tiny_llava import prompt_text

    ad = LlavaAdapter("tiny_llava_synth", "bench:tiny-llava-synth", device="cpu", dtype="float32").load()
    rows = load_test(n=8)[:4]
    batch = ad.processor(images=[r["image"] for r in rows], text=[prompt_text(r["question"]) for r in rows],
                         return_tensors="pt", padding=True)
    return ad, batch


def _method(name: str):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(f"conf/method/{name}.yaml")
    cfg.prune_ratio = 0.75
    cfg.seed = 0
    cfg.pop("name")
    return instantiate(cfg)


def _single(batch, i):
    keep = batch["attention_mask"][i].bool()
    return {"input_ids": batch["input_ids"][i : i + 1, keep], "attention_mask": batch["attention_mask"][i : i + 1, keep],
            "pixel_values": batch["pixel_values"][i : i + 1]}


def test_the_in_llm_methods_are_found():
    assert {"fastv", "pdrop", "sparsevlm", "dart", "transprune", "vscan"} <= set(IN_LLM)


@pytest.mark.parametrize("name", IN_LLM)
def test_generate_batch1_equals_batch4(name, tiny):
    ad, batch = tiny
    m = _method(name)
    seeds = torch.arange(4)
    with torch.no_grad():
        prepared = ad.prepare(batch, m, seeds)
        out4 = ad.generate(prepared, max_new_tokens=STEPS, method=m, min_new_tokens=STEPS)
        assert prepared.extras["llm_stages"], f"{name} did not prune"
        assert out4.shape == (4, STEPS)
        for i in range(4):
            p1 = ad.prepare(_single(batch, i), m, seeds[i : i + 1])
            out1 = ad.generate(p1, max_new_tokens=STEPS, method=m, min_new_tokens=STEPS)
            assert out1[0].tolist() == out4[i].tolist(), f"{name}: sample {i} decodes differently at batch 1 and 4"


def test_cache_argument_under_either_name(tiny):
    """The LM-input hook finds the KV cache whether transformers calls it ``past_key_values`` or ``cache``."""
    from transformers import DynamicCache

    from bench.models.llm_pruning import _Runner

    ad, batch = tiny
    cache = DynamicCache(config=ad.model.config.get_text_config())
    ids = torch.ones(1, 1, dtype=torch.long)
    k = torch.zeros(1, ad.model.config.text_config.num_key_value_heads, 3,
                    ad.model.config.text_config.hidden_size // ad.model.config.text_config.num_attention_heads)
    cache.update(k, k, 0)
    for name in ("past_key_values", "cache"):
        r = _Runner.__new__(_Runner)
        r.call_id = 0
        r.lm_pre(None, (), {"input_ids": ids, name: cache})
        assert r.prefill is False and r.cache is cache, name
