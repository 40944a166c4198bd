"""In-LLM methods on LLaVA-NeXT (``bench.models.llava_next_inllm``), on a tiny random-config model (CPU, float32).

The model is ``tests/test_llava_next.py``'s (56 px tiles of 4 x 4 tokens, anyres crops, unpadding, newlines) with
an 8-layer LLM whose weights are scaled up so attention is far from uniform (as ``tests/test_llm_methods.py``).
The image sizes give 52, 56 and 88 packed tokens, so a batch of 8 holds three visual counts.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from bench.errors import IncompatibleMethodError
from methods.registry import create
from test_llava_next import EOS, IMG, PAD, SIZES, make_batch, one_sample, seeds
from test_llm_methods import METHOD_NAMES, _methods, _reference_generate, _reference_logits

STEPS = 5


def tiny_llava_next8(seed: int = 0, attn: str = "sdpa"):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14, projection_dim=32)
    tc = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                     pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS)
    cfg = LlavaNextConfig(vision_config=vc, text_config=tc, image_token_index=IMG, image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]],
                          vision_feature_layer=-2, vision_feature_select_strategy="default")
    cfg.pad_token_id = PAD
    for c in (cfg, vc, tc):
        c._attn_implementation = attn
    model = LlavaNextForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.model.image_newline.normal_(generator=g)
        for name, p in model.named_parameters():
            if p.dim() == 2 and ("language_model" in name or "lm_head" in name or "projector" in name):
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]) * 1.5)
    return model


def _adapter(attn="sdpa", budget="image"):
    from bench.models.llava_next import LlavaNextAdapter

    a = LlavaNextAdapter(name="tiny_next8", source="none", weights="random", device="cpu", dtype="float32", budget=budget)
    a.model = tiny_llava_next8(attn=attn)
    return a


@pytest.fixture(scope="module")
def adapter():
    return _adapter()


def _vscan(**kw):
    # 2 x 2 windows (a 4 x 4 tile holds no 6 x 6 one); P = 8 per tile: 4 local (1 per window) + 4 global
    return create("vscan", 0.5, budget="official", visual_token_num=8, image_token_list=[3], layer_list=[16], window_size=2, **kw)


# ------------------------------------------------------------------------------------------ every method
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_ratio_zero_is_the_unpruned_model_bit_for_bit(adapter, name):
    m = _methods(ratio=0.0, budget="layer_mean")[name]
    batch = make_batch(adapter, SIZES[:4])  # three counts: three groups, no hooks
    prepared = adapter.prepare(batch, m, seeds(4))
    ours = adapter.generate(prepared, max_new_tokens=STEPS, method=m)
    # the adapter has no processor here, so no EOS stop (as LlavaAdapter.generate passes eos_token_id=None)
    ref = adapter.model.generate(**batch, max_new_tokens=STEPS, do_sample=False, pad_token_id=PAD, eos_token_id=None)[:, batch["input_ids"].shape[1]:]
    assert torch.equal(ours, ref)
    one = adapter.prepare(one_sample(batch, 1), m, seeds(1))
    with torch.no_grad():
        full = adapter.model(**one_sample(batch, 1), logits_to_keep=1)
    assert torch.equal(adapter.prefill(one, m).logits, full.logits)
    assert prepared.extras["visual_tokens_per_layer"].tolist() == [[n] * 8 for n in prepared.visual_tokens_in]


@pytest.mark.parametrize("name", METHOD_NAMES + ["sparsevlm2"])
def test_pruned_generate_equals_physical_removal(adapter, name):
    """The kept sets of one prefill, removed by hand layer by layer (kept tokens at their unpruned positions where the
    method keeps original ids: FastV, DART), give the same logits and greedy tokens. The image block is the whole
    packed span, newlines included."""
    m = _methods()[name]
    batch = make_batch(adapter, SIZES[2:3])  # 112 x 112: 4 crops, 88 packed tokens (8 newlines)
    prepared = adapter.prepare(batch, m, seeds(1))
    n = prepared.visual_tokens_in[0]
    assert prepared.visual_tokens_kept[0] == n == 88 and prepared.extras["newline_tokens_kept"] == [8]
    with torch.no_grad():
        out = adapter.prefill(prepared, m)
        stages = {"span": prepared.extras["image_spans"][0].tolist(), "stages": prepared.extras["llm_stages"]}
        assert stages["stages"], "the method did not prune"
        renumber = m.plan(n, 8)[0].renumber
        ref = _reference_logits(adapter, prepared.inputs_embeds, stages, renumber)
        torch.testing.assert_close(out.logits[0, -1], ref[0, -1], atol=1e-4, rtol=1e-4)
        gen = adapter.generate(prepared, max_new_tokens=STEPS, method=m)[0].tolist()
        ref_gen = _reference_generate(adapter, prepared, stages, renumber, STEPS)
    assert gen == ref_gen
    plan = m.plan(n, 8)
    counts = prepared.extras["visual_tokens_per_layer"][0].tolist()
    assert counts[plan[0].layer - 1] == n and counts[-1] == plan[-1].n_keep
    # newline rows are candidates like the others (the span is the packed image)
    assert stages["stages"][0]["kept_index"].max() < n


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_batch_of_8_equals_batch_of_1(adapter, name):
    m = _methods(ratio=0.5)[name]
    batch = make_batch(adapter, SIZES)
    prepared = adapter.prepare(batch, m, seeds(8))
    assert len(set(prepared.visual_tokens_in)) == 3
    together = adapter.generate(prepared, max_new_tokens=4, method=m)
    groups = prepared.extras["llm_stage_groups"]
    assert sorted(i for g in groups for i in g["samples"]) == list(range(8))
    vpl = prepared.extras["visual_tokens_per_layer"]
    for i in range(8):
        p1 = adapter.prepare(one_sample(batch, i), m, seeds(8)[i:i + 1])
        single = adapter.generate(p1, max_new_tokens=4, method=m)[0].tolist()
        assert together[i].tolist()[: len(single)] == single
        g = next(g for g in groups if i in g["samples"])
        j = g["samples"].index(i)
        for s, s1 in zip(g["stages"], p1.extras["llm_stages"]):
            assert torch.equal(s["kept_index"][j], s1["kept_index"][0])
        assert torch.equal(vpl[i], p1.extras["visual_tokens_per_layer"][0])


def test_refusals_and_budget_convention():
    a = _adapter(budget="tile")
    with pytest.raises(IncompatibleMethodError, match="model.budget=image"):
        a.check_method(create("fastv", 0.5))
    a.check_method(create("fastv", 0.0))  # nothing pruned: any convention
    b = _adapter()
    b.check_method(create("pdrop", 0.5))
    with pytest.raises(IncompatibleMethodError, match="model.budget=tile"):
        b.check_method(_vscan())
    with pytest.raises(IncompatibleMethodError, match="window"):
        a.check_method(create("vscan", 0.5))  # 6 x 6 windows on a 4 x 4 tile
    a.check_method(_vscan())
    # mixed counts in one prefill: refused with the reason (generate groups them)
    m = create("fastv", 0.5)
    prepared = b.prepare(make_batch(b, SIZES[:3]), m, seeds(3))
    with pytest.raises(IncompatibleMethodError, match="one visual-token count"):
        b.prefill(prepared, m)


# ------------------------------------------------------------------------------------------ VScan
def _eager_cls(adapter, pixels, tiles, layer):
    vt = copy.deepcopy(adapter.model.model.vision_tower)
    vt.config._attn_implementation = "eager"
    with torch.no_grad():
        att = vt(pixels[:tiles], output_attentions=True).attentions[layer]
    return att[:, :, 0, 1:].mean(dim=1)


@torch.no_grad()
def _official_vscan_image(adapter, m, pixels, size):
    """VScan's official LLaVA-NeXT pre-LLM layout, rebuilt from the eager tower's attentions: per tile the scans
    and the merge (``vscan_keep_mask``, ``merge_into_kept``), then transformers' own packing of the merged tiles
    and of the kept mask (stitching, unpadding, newline rows kept)."""
    from methods.vscan import merge_into_kept, vscan_keep_mask

    tiles = adapter._num_tiles(size)
    hidden = adapter.model.model.vision_tower(pixels[:tiles], output_hidden_states=True).hidden_states
    proj = adapter.model.model.multi_modal_projector(hidden[-2][:, 1:])
    n_layers = len(hidden) - 1
    shallow = _eager_cls(adapter, pixels, tiles, min(n_layers - 1, round(5 * n_layers / 24)))  # "5@24" on this tower
    deep = _eager_cls(adapter, pixels, tiles, -2)
    p = m.counts(adapter.tile_tokens)[0]
    mask = vscan_keep_mask(shallow, deep, adapter.grid, p, m.window_size, m.global_ratio)
    merged = proj.clone()
    for t in range(tiles):
        keep, drop = mask[t].nonzero().flatten(), (~mask[t]).nonzero().flatten()
        merged[t, keep] = merge_into_kept(proj[t], keep, drop)
    mm = adapter.model.model
    feats, _ = mm.pack_image_features([merged], size.view(1, 2), "default", image_newline=mm.image_newline)
    flags, _ = mm.pack_image_features([mask.unsqueeze(-1).float()], size.view(1, 2), "default", image_newline=torch.ones(1))
    return feats[0][flags[0][:, 0] > 0], p


@torch.no_grad()
def test_vscan_pre_llm_equals_the_official_layout_built_by_hand():
    a = _adapter(budget="tile")
    m = _vscan()
    batch = make_batch(a, SIZES[:4])
    prepared = a.prepare(batch, m, seeds(4))
    for i in range(4):
        rows, p = _official_vscan_image(a, m, batch["pixel_values"][i], batch["image_sizes"][i])
        s0, s1 = prepared.extras["image_spans"][i].tolist()
        torch.testing.assert_close(prepared.inputs_embeds[i, s0:s1], rows, atol=1e-6, rtol=1e-6)
        assert prepared.extras["newline_tokens_kept"][i] == prepared.extras["newline_tokens"][i]
        w0, w1 = prepared.extras["llm_spans"][i].tolist()
        assert w0 == s0 and w1 - w0 == min(p, s1 - s0)  # the official in-LLM image: the first min(P, sent) tokens
        assert prepared.extras["llm_query_offsets"][i] == (s1 - s0) - (w1 - w0)


@torch.no_grad()
@pytest.mark.parametrize("span", ["official", "image"])
def test_vscan_in_llm_stage_scores_the_official_row_and_block(span):
    """The stage's kept set is layer 4's (16 of 32, scaled) own attention from the official query row (``span=official``:
    ``N' - P`` rows before the last; ``image``: the last) over the official block, read from an eager forward's
    ``output_attentions``; the pruned generate equals physical removal of those tokens."""
    a = _adapter(budget="tile")
    eager = _adapter(attn="eager", budget="tile")
    m = _vscan(llm_span=span)
    batch = make_batch(a, SIZES[2:3])
    prepared = a.prepare(batch, m, seeds(1))
    out = a.prefill(prepared, m)
    (st,) = prepared.extras["llm_stages"]
    layer = st["layer"]
    assert layer == 4
    k = prepared.visual_tokens_kept[0]
    s0, s1 = prepared.extras["image_spans"][0].tolist()
    if span == "official":
        w, off = min(8, k), k - min(8, k)
        assert off > 0
    else:
        w, off = k, 0
        assert "llm_spans" not in prepared.extras
    att = eager.model(inputs_embeds=prepared.inputs_embeds, output_attentions=True).attentions[layer]  # (1, H, T, T)
    t = prepared.inputs_embeds.shape[1]
    score = att[0, :, t - 1 - off, s0:s0 + w].mean(0)
    ref = score.topk(3).indices.sort().values
    assert st["kept_index"][0].tolist() == ref.tolist()
    stages = {"span": [s0, s0 + w], "stages": prepared.extras["llm_stages"]}
    ref_logits = _reference_logits(a, prepared.inputs_embeds, stages, True)
    torch.testing.assert_close(out.logits[0, -1], ref_logits[0, -1], atol=1e-4, rtol=1e-4)
    assert a.generate(prepared, max_new_tokens=STEPS, method=m)[0].tolist() == _reference_generate(a, prepared, stages, True, STEPS)
    vpl = prepared.extras["visual_tokens_per_layer"][0].tolist()
    assert vpl[layer - 1] == k and vpl[layer] == k - (w - 3)


def test_vscan_ratio_zero_and_batch_of_8_equals_batch_of_1():
    a = _adapter(budget="tile")
    batch = make_batch(a, SIZES)
    m0 = create("vscan", 0.0, window_size=2)
    p0 = a.prepare(batch, m0, seeds(8))
    # the adapter has no processor here, so no EOS stop (as LlavaAdapter.generate passes eos_token_id=None)
    ref = a.model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=PAD, eos_token_id=None)[:, batch["input_ids"].shape[1]:]
    assert torch.equal(a.generate(p0, max_new_tokens=4, method=m0), ref)
    m = _vscan()
    prepared = a.prepare(batch, m, seeds(8))
    together = a.generate(prepared, max_new_tokens=4, method=m)
    for i in range(8):
        p1 = a.prepare(one_sample(batch, i), m, seeds(8)[i:i + 1])
        assert p1.visual_tokens_kept[0] == prepared.visual_tokens_kept[i]
        single = a.generate(p1, max_new_tokens=4, method=m)[0].tolist()
        assert together[i].tolist()[: len(single)] == single


@pytest.mark.parametrize("name", ["fastv", "pdrop", "sparsevlm", "transprune"])
def test_analytic_flops_equal_the_counter(adapter, name):
    """The families' analytic model runs each LLM layer on the tokens the stages left (per-layer counts), and the
    method's selection formula over the packed span; the FLOP counter over prepare + prefill agrees exactly."""
    from bench.measure.efficiency import measure_efficiency

    m = _methods(ratio=0.5)[name]
    eff, _ = measure_efficiency(adapter, m, make_batch(adapter, SIZES[2:3]), seeds(1), warmup=0, repeats=1)
    assert eff["measured_visual_tokens_per_layer"][-1] < 88
    assert eff["tflops_prefill_analytic"] == pytest.approx(eff["tflops_prefill"], rel=1e-9)
    assert eff["tflops_selection_analytic"] > 0
