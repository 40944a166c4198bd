"""In-LLM pruning on a tiny random-config Qwen2.5-VL (CPU, float32): the runner of ``bench.models.llm_pruning`` on
Qwen2's decoder with 3-D M-RoPE positions.

References are written by hand: the decoder layers run one by one, the pruned tokens' rows physically removed at
the pruning layer (their 3-D positions and rotary rows with them), decoding at the unpruned prompt's max + 1.
"""

from __future__ import annotations

import pytest
import torch

from bench.errors import IncompatibleMethodError
from methods.registry import create
from test_qwen25vl import EOS, GRIDS, make_batch, one_sample, seeds, tiny_qwen

METHODS = [("fastv", {}), ("dart", {}), ("sparsevlm", {"version": "2.0"}), ("transprune", {"renumber_positions": False}),
           ("pdrop", {"renumber_positions": False, "budget": "layer_mean"})]


@pytest.fixture(scope="module")
def adapter():
    from bench.models.qwen25vl import Qwen25VLAdapter

    a = Qwen25VLAdapter(name="tiny_qwen", source="none", weights="random", device="cpu", dtype="float32")
    a.model = tiny_qwen(seed=1)
    return a


@torch.no_grad()
def manual_pruned_decode(model, emb, pos, stages, steps):
    """Layer-by-layer greedy decoding of one sample: ``stages`` = ``[(layer, rows kept from there on)]`` (rows of
    the sequence entering that stage, applied in order); each layer's cache holds what it saw; decode at ``max(pos) + 1``."""
    from transformers import DynamicCache

    lm = model.model.language_model
    cache = DynamicCache(config=lm.config)

    def run(h, pe, prefill):
        for li, layer in enumerate(lm.layers):
            for rows in (r for at, r in stages if prefill and at == li):  # several stages may share a layer: in order
                h, pe = h[:, rows], tuple(x[:, rows] for x in pe)
            h = layer(h, attention_mask=None, position_embeddings=pe, position_ids=None, past_key_values=cache, use_cache=True)
            h = h[0] if isinstance(h, tuple) else h
        return model.lm_head(lm.norm(h[:, -1]))

    logits = run(emb, lm.rotary_emb(emb, pos), True)
    nxt_pos, toks = int(pos.max()) + 1, []
    for _ in range(steps):
        nxt = int(logits.argmax(-1))
        toks.append(nxt)
        if nxt == EOS:
            break
        e = model.get_input_embeddings()(torch.tensor([[nxt]]))
        p = torch.full((3, 1, 1), nxt_pos)
        nxt_pos += 1
        logits = run(e, lm.rotary_emb(e, p), False)
    return toks


def _stage_rows(rec, s0, n, t):
    """Rows of the sequence entering each recorded stage's layer (the visual block starts at ``s0``)."""
    out, n_cur = [], n
    for st in rec:
        kept = st["kept_rel"][0].tolist()
        t_cur = t - n + n_cur
        rows = list(range(s0)) + [s0 + j for j in kept] + list(range(s0 + n_cur, t_cur))
        out.append((st["layer"], torch.tensor(rows)))
        n_cur = len(kept)
    return out


@pytest.mark.parametrize("name,kw", METHODS, ids=[m for m, _ in METHODS])
def test_inllm_generate_equals_physical_removal(adapter, name, kw):
    batch = make_batch(GRIDS[:3])
    m = create(name, 0.5, **kw)
    adapter.check_method(m)
    for i in range(3):
        one = one_sample(batch, i)
        prepared = adapter.prepare(one, m, seeds(3)[i:i + 1])
        ours = adapter.generate(prepared, max_new_tokens=5, method=m)[0].tolist()
        rec = prepared.extras["llm_stages"]
        assert rec and all(st["kept_index"].shape[1] == st["n_keep"] for st in rec)
        s0, s1 = prepared.extras["image_spans"][0].tolist()
        t = prepared.input_ids.shape[1]
        with torch.no_grad():
            pos = adapter.rope_positions(one)
        toks = manual_pruned_decode(adapter.model, prepared.inputs_embeds, pos, _stage_rows(rec, s0, s1 - s0, t), 5)
        assert ours[: len(toks)] == toks, (name, i)


def test_inllm_ratio_zero_is_the_unpruned_model_bit_for_bit(adapter):
    one = one_sample(make_batch(GRIDS[1:2]), 0)
    with torch.no_grad():
        full = adapter.model(**one, logits_to_keep=1)
    for name, kw in METHODS:
        m = create(name, 0.0, **kw)
        assert torch.equal(adapter.prefill(adapter.prepare(one, m, seeds(1)), m).logits, full.logits)


@torch.no_grad()
def test_fastv_selection_equals_the_official_rule(adapter):
    """FastV (official ``LlamaModel.forward``): head-mean of the last token's attention at layer K-1 over the image,
    topk, sorted. Loop reference from the layer's own projections and the model's rotary tables."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb

    m = create("fastv", 0.6)
    lm = adapter.model.model.language_model
    for i, grid in enumerate(GRIDS[:4]):
        one = one_sample(make_batch([grid], seed=i), 0)
        prepared = adapter.prepare(one, m, seeds(1))
        adapter.prefill(prepared, m)
        (st,) = prepared.extras["llm_stages"]
        k_layer = st["layer"]
        h = prepared.inputs_embeds
        pos = adapter.rope_positions(one)
        pe = lm.rotary_emb(h, pos)
        for layer in lm.layers[: k_layer - 1]:
            h = layer(h, attention_mask=None, position_embeddings=pe, position_ids=None)
        at = lm.layers[k_layer - 1].self_attn
        x = lm.layers[k_layer - 1].input_layernorm(h)
        t = x.shape[1]
        q = at.q_proj(x).view(1, t, -1, at.head_dim).transpose(1, 2)
        k = at.k_proj(x).view(1, t, -1, at.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *pe)
        s0, s1 = prepared.extras["image_spans"][0].tolist()
        scores = []
        for j in range(s0, s1):
            per_head = []
            for hh in range(q.shape[1]):
                kv = k[0, hh // (q.shape[1] // k.shape[1])]
                row = torch.softmax((kv @ q[0, hh, -1]) * at.scaling, dim=-1)
                per_head.append(float(row[j]))
            scores.append(sum(per_head) / len(per_head))
        want = sorted(sorted(range(len(scores)), key=lambda j: -scores[j])[: st["n_keep"]])
        assert st["kept_index"][0].tolist() == want


@pytest.mark.parametrize("name,kw", METHODS[:2], ids=[m for m, _ in METHODS[:2]])
def test_inllm_batch_of_8_mixed_sizes_equals_batch_of_1(adapter, name, kw):
    batch = make_batch(GRIDS)
    m = create(name, 0.5, **kw)
    prepared = adapter.prepare(batch, m, seeds(8))
    together = adapter.generate(prepared, max_new_tokens=4, method=m)
    vpl = prepared.extras["visual_tokens_per_layer"]
    for i in range(8):
        p1 = adapter.prepare(one_sample(batch, i), m, seeds(8)[i:i + 1])
        alone = adapter.generate(p1, max_new_tokens=4, method=m)[0].tolist()
        assert together[i].tolist()[: len(alone)] == alone
        assert vpl[i].tolist() == p1.extras["visual_tokens_per_layer"][0].tolist()


def test_inllm_kept_tokens_keep_their_3d_positions(adapter):
    """The pruned layers receive, per kept token, the rotary rows of its own unpruned 3-D position."""
    batch = make_batch(GRIDS[:2])
    m = create("fastv", 0.5)
    lm = adapter.model.model.language_model
    for i in range(2):
        one = one_sample(batch, i)
        prepared = adapter.prepare(one, m, seeds(1))
        seen = {}
        with adapter.llm_pruning(m, prepared) as runner:
            (st,) = runner.plan
            hook = lm.layers[st.layer].register_forward_pre_hook(
                lambda mod, a, kw: seen.setdefault("pe", kw["position_embeddings"]) and None, with_kwargs=True)
            try:
                adapter.prefill(prepared)
            finally:
                hook.remove()
        kept = prepared.extras["llm_stages"][0]["kept_rel"][0]
        s0, s1 = prepared.extras["image_spans"][0].tolist()
        t = prepared.input_ids.shape[1]
        rows = torch.cat([torch.arange(s0), s0 + kept, torch.arange(s1, t)])
        pos = adapter.rope_positions(one)[:, :, rows]
        want = lm.rotary_emb(prepared.inputs_embeds[:, rows], pos)
        assert all(torch.equal(a, b) for a, b in zip(seen["pe"], want))
        assert seen["pe"][0].shape[1] == t - (s1 - s0) + st.n_keep


def test_inllm_refusals_name_the_reason(adapter):
    with pytest.raises(IncompatibleMethodError, match="renumbers positions"):
        adapter.check_method(create("pdrop", 0.5, budget="layer_mean"))
    with pytest.raises(IncompatibleMethodError, match="renumbers positions"):
        adapter.check_method(create("transprune", 0.5))
    with pytest.raises(IncompatibleMethodError, match="renumbers positions|merges"):
        adapter.check_method(create("sparsevlm", 0.5))
    adapter.check_method(create("vscan", 0.5))  # its official Qwen2.5-VL port (tests/test_qwen_vscan.py)
    for name, kw in METHODS:
        adapter.check_method(create(name, 0.5, **kw))


@pytest.fixture(scope="module")
def deep_adapter():
    from bench.models.qwen25vl import Qwen25VLAdapter

    a = Qwen25VLAdapter(name="tiny_qwen", source="none", weights="random", device="cpu", dtype="float32")
    a.model = tiny_qwen(seed=4, llm_layers=4)  # layers after every method's scoring layer
    return a


@pytest.mark.parametrize("name,kw", METHODS + [("divprune", {}), ("random", {}), ("gprune", {}), ("holov", {}),
                                               ("holov", {"qwen_order": "raster"}), ("vscan", {}), ("visionzip", {})])
def test_analytic_flops_equal_the_counter(deep_adapter, name, kw):
    """Every method Qwen2.5-VL runs: the analytic model (tower, merger, selection, each LLM layer on the tokens it
    receives) equals the counter on the whole prepare + prefill, exactly."""
    from bench.measure.flops import analytic_adapter, count_flops

    batch = deep_adapter.probe_batch(batch_size=2, size=(224, 224))
    m = create(name, 0.5, **kw)
    deep_adapter.check_method(m)
    prepared = deep_adapter.prepare(batch, m, seeds(2))
    counted, _ = count_flops(lambda: deep_adapter.prefill(prepared, m))
    got = analytic_adapter(deep_adapter, m, prepared, batch)
    assert got.vision + got.projector + got.llm + got.lm_head + got.selection == pytest.approx(
        count_flops(lambda: deep_adapter.prepare(batch, m, seeds(2)))[0] + counted, rel=1e-9)
    if m.stage == "in_llm":
        assert got.per_llm_layer[0] > got.per_llm_layer[-1]
