"""Wave-2 methods (issue 24): G-Prune, HoloV, FlowCut, VScan, on CPU.

* the vectorised rules == the plain loop references of ``tests/reference_vision.py`` on random inputs of
  the real shapes (576 tokens, 24x24 grid, D = 1024 / 4096), float64 so that only true ties could differ:
  exact kept index sets, output order, zero padding;
* budgets: G-Prune rounds down like the official ``int(keep_ratio * 576)``;
* end to end on a tiny LLaVA: prepare + generate, per-sample batches, G-Prune's original position ids;
  VScan's two stages (pre-LLM scans and merge, then its LLM stage against a layer-by-layer forward with
  the dropped tokens physically removed).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from reference_vision import ref_gprune, ref_holov

from methods.base import VisionContext
from methods.gprune import GPrune
from methods.holov import HoloV, chunk_layout

def gen(seed):
    return torch.Generator().manual_seed(seed)


def clustered(b: int, n: int, d: int, g, clusters: int = 8, noise: float = 0.8) -> torch.Tensor:
    """Tokens around a few centres, so that a 0.5 cosine threshold leaves a real graph."""
    centres = torch.randn(clusters, d, generator=g, dtype=torch.float64)
    return centres[torch.randint(0, clusters, (b, n), generator=g)] + noise * torch.randn(b, n, d, generator=g, dtype=torch.float64)


def peaked_cls(b: int, n: int, heads: int, g, hot: int = 40) -> torch.Tensor:
    """``(B, H, 1 + N)`` CLS-row probabilities with a few hot tokens packed into the first chunks (so that
    some chunk quotas exceed their size)."""
    logits = torch.randn(b, heads, n + 1, generator=g, dtype=torch.float64) * 2.0
    idx = 1 + torch.randint(0, n // 3, (b, hot), generator=g)
    logits.scatter_add_(2, idx.unsqueeze(1).expand(-1, heads, -1), torch.full((b, heads, hot), 4.0, dtype=torch.float64))
    return logits.softmax(dim=-1)


def cls_ctx(cls_attn: torch.Tensor) -> VisionContext:
    return VisionContext((24, 24), True, torch.zeros(cls_attn.shape[0], dtype=torch.long), {"cls_attn:-2": lambda: cls_attn})


# ----------------------------------------------------------------------------- G-Prune
@pytest.mark.parametrize("ratio,d", [(0.5, 1024), (0.667, 4096), (0.75, 1024), (0.9, 4096)])
def test_gprune_matches_reference(ratio, d):
    x = clustered(2, 576, d, gen(int(ratio * 100) + d))
    m = GPrune(prune_ratio=ratio)
    got = m.select(x, None)
    assert got.shape == (2, m.n_keep(576))
    for i in range(2):
        assert got[i].tolist() == ref_gprune(x[i], m.n_keep(576))


def test_gprune_budget_rounds_down_like_official():
    assert [GPrune(prune_ratio=r).n_keep(576) for r in (0.5, 0.667, 0.75, 0.9)] == [288, 191, 144, 57]
    assert [GPrune(prune_ratio=r, rounding="round").n_keep(576) for r in (0.667, 0.9)] == [192, 58]
    assert GPrune(prune_ratio=0.0).n_keep(576) == 576


def test_gprune_is_per_sample():
    x = clustered(3, 576, 64, gen(5))
    m = GPrune(prune_ratio=0.75)
    whole = m.select(x, None)
    for i in range(3):
        assert torch.equal(whole[i], m.select(x[i : i + 1], None)[0])


def test_gprune_selection_flops_counts_matrix_power():
    from bench.measure.flops import count_flops
    from methods.gprune import gprune_scores

    x = torch.randn(1, 100, 16)
    counted, _ = count_flops(lambda: gprune_scores(x))
    cost = SimpleNamespace(batch=1, n_visual=100, llm_width=16)  # the CostModel fields the formula reads
    assert counted == GPrune(prune_ratio=0.5).selection_flops(cost)


# ----------------------------------------------------------------------------- HoloV
def test_chunk_layout_uneven():
    idx, valid = chunk_layout(35, 4)
    assert valid.sum(dim=1).tolist() == [9, 9, 9, 8]
    assert idx[valid].tolist() == list(range(35))


@pytest.mark.parametrize("ratio,d", [(0.5, 4096), (0.75, 1024), (0.889, 1024), (0.9, 4096)])
def test_holov_matches_reference(ratio, d):
    g = gen(int(ratio * 1000) + d)
    x = clustered(2, 576, d, g)
    cls = peaked_cls(2, 576, 16, g)
    m = HoloV(prune_ratio=ratio)
    sel = m.reduce(x, cls_ctx(cls))
    t = m.n_keep(576)
    assert sel.features.shape == (2, t, d) and sel.n_kept.tolist() == [t, t]
    attn = cls[:, :, 1:].mean(dim=1).float()
    for i in range(2):
        ref = ref_holov(x[i], attn[i], t)
        assert sel.extras["source_index"][i].tolist() == ref
        real = torch.tensor(ref) >= 0
        assert torch.equal(sel.features[i, real], x[i, torch.tensor(ref)[real]])
        assert torch.count_nonzero(sel.features[i, ~real]) == 0  # the official zero rows


def test_holov_pads_with_zero_rows_when_chunks_overflow():
    """A hot chunk's quota above its 36 tokens: the excess becomes zero rows (official), or is not sent (drop)."""
    g = gen(11)
    x = clustered(1, 576, 64, g)
    cls = torch.full((1, 4, 577), 1e-4, dtype=torch.float64)
    cls[:, :, 1:37] = 1.0  # chunk 0 holds nearly all the attention
    cls = cls / cls.sum(dim=-1, keepdim=True)
    sel = HoloV(prune_ratio=0.5).reduce(x, cls_ctx(cls))
    idx = sel.extras["source_index"][0]
    assert idx[:36].tolist() == list(range(36))  # a whole chunk: raster order
    n_zero = int((idx < 0).sum())
    assert n_zero > 0 and (idx[-n_zero:] < 0).all() and sel.n_kept.tolist() == [288]
    dropped = HoloV(prune_ratio=0.5, overflow="drop").reduce(x, cls_ctx(cls))
    assert dropped.n_kept.tolist() == [288 - n_zero]
    assert torch.equal(dropped.features[0, : 288 - n_zero], sel.features[0, : 288 - n_zero])
    assert not HoloV(prune_ratio=0.5, overflow="drop").graph_safe and HoloV(prune_ratio=0.5).graph_safe


def test_holov_order_is_by_attention_inside_a_chunk():
    g = gen(2)
    x = clustered(1, 576, 64, g)
    cls = peaked_cls(1, 576, 4, g)
    sel = HoloV(prune_ratio=0.9).reduce(x, cls_ctx(cls))
    attn = cls[0, :, 1:].mean(dim=0)
    idx = [j for j in sel.extras["source_index"][0].tolist() if j >= 0]
    chunk = [j // 36 for j in idx]
    assert chunk == sorted(chunk)
    for c in set(chunk):
        mine = [j for j in idx if j // 36 == c]
        if len(mine) < 36:
            assert [float(attn[j]) for j in mine] == sorted((float(attn[j]) for j in mine), reverse=True)


def test_holov_refuses_towers_without_cls():
    from bench.errors import IncompatibleMethodError

    with pytest.raises(IncompatibleMethodError):
        HoloV(prune_ratio=0.5).check_compatible(VisionContext((24, 24), False, torch.zeros(1)))


# ----------------------------------------------------------------------------- on a tiny LLaVA
SIZES = {"vision_hidden": 32, "vision_layers": 4, "vision_heads": 2, "vision_mlp": 64, "text_hidden": 64, "text_layers": 2, "text_heads": 2, "text_mlp": 128}


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    from bench.models.llava import LlavaAdapter
    from bench.tiny_llava import build_model, build_processor

    model = build_model(SIZES, seed=0)
    g = gen(3)
    with torch.no_grad():  # larger vision weights than the 0.02 init: attention far from uniform
        for name, p in model.named_parameters():
            if p.dim() == 2 and "vision_tower" in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5 * 2.0)
    path = tmp_path_factory.mktemp("tiny-wave2")
    model.save_pretrained(path)
    build_processor().save_pretrained(path)
    return LlavaAdapter("tiny", str(path), device="cpu", dtype="float32").load()


@pytest.fixture(scope="module")
def batch(adapter):
    import numpy as np
    from PIL import Image

    from bench.tiny_llava import prompt_text

    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (336, 336, 3), dtype=np.uint8)) for _ in range(2)]
    return adapter.processor(images=imgs, text=[prompt_text("what color is it"), prompt_text("how many")], return_tensors="pt", padding=True)


WAVE2 = {"gprune": lambda r: GPrune(prune_ratio=r), "holov": lambda r: HoloV(prune_ratio=r)}


@pytest.mark.parametrize("name", sorted(WAVE2))
def test_end_to_end_prepare_generate_per_sample(adapter, batch, name):
    m = WAVE2[name](0.75)
    adapter.check_method(m)
    seeds = torch.tensor([5, 6])
    prepared = adapter.prepare(batch, m, seeds)
    assert prepared.visual_tokens_kept == [m.n_keep(576)] * 2
    out = adapter.generate(prepared, max_new_tokens=3, method=m)
    assert out.shape[0] == 2
    one = adapter.prepare({k: v[1:] for k, v in batch.items()}, m, seeds[1:])
    tok = prepared.inputs_embeds[1][prepared.input_ids[1] == adapter.image_token_id]
    tok1 = one.inputs_embeds[0][one.input_ids[0] == adapter.image_token_id]
    torch.testing.assert_close(tok, tok1, rtol=1e-5, atol=1e-5)


def test_gprune_keeps_original_position_ids(adapter, batch):
    m = GPrune(prune_ratio=0.75)
    p = adapter.prepare(batch, m, torch.tensor([0, 1]))
    pos = p.extras["position_ids"]
    full = adapter.prepare(batch, GPrune(prune_ratio=0.0), torch.tensor([0, 1]))
    assert "position_ids" in full.extras
    kept = m.select(adapter.encode_images(batch["pixel_values"]), None)
    for i in range(2):
        s0, s1 = p.extras["image_spans"][i].tolist()
        f0 = int(full.extras["image_spans"][i, 0])
        valid = p.attention_mask[i].bool()
        n_text_after = int(valid[s1:].sum())
        assert pos[i, s0:s1].tolist() == (int(full.extras["position_ids"][i, f0]) + kept[i]).tolist()
        assert pos[i, s1:].tolist() == full.extras["position_ids"][i, -n_text_after:].tolist()  # text keeps its old ids
    # the prefill and generation use them: the same logits as the model run with those ids by hand
    out = adapter.prefill(p)
    ref = adapter.model(inputs_embeds=p.inputs_embeds, attention_mask=p.attention_mask, position_ids=pos, logits_to_keep=1)
    torch.testing.assert_close(out.logits, ref.logits)
    renum = adapter.prepare(batch, GPrune(prune_ratio=0.75, renumber_positions=True), torch.tensor([0, 1]))
    assert "position_ids" not in renum.extras
    assert not torch.allclose(adapter.prefill(renum).logits, out.logits)
    assert adapter.generate(p, max_new_tokens=2).shape == (2, 2)


# ----------------------------------------------------------------------------- FlowCut
DEEP = {"vision_hidden": 32, "vision_layers": 12, "vision_heads": 2, "vision_mlp": 64, "text_hidden": 64, "text_layers": 2, "text_heads": 2, "text_mlp": 128}


@pytest.fixture(scope="module")
def deep_tower():
    """A 12-layer tiny CLIP (11 blocks up to the feature layer: entropy cuts after blocks 1, 3, 5, 7, the
    last cut after block 9) in float64, weights scaled so that attention is far from uniform."""
    from bench.tiny_llava import build_model

    model = build_model(DEEP, seed=0).double()
    g = gen(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "vision_tower" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) / p.shape[1] ** 0.5 * 3.0)
    return model.eval()


@pytest.mark.parametrize("target", [288, 144, 58])
def test_flowcut_tower_matches_reference(deep_tower, target):
    from reference_vision import ref_flowcut

    from bench.models.clip_extras import vision_model
    from bench.models.vision_merge import feature_block_count
    from bench.models.vision_prune import pruning_encoder
    from methods.flowcut import FlowCut

    m = FlowCut(prune_ratio=1 - target / 576)
    assert m.n_keep(576) == target
    vm = vision_model(deep_tower)
    nb = feature_block_count(deep_tower)
    px = torch.randn(1, 3, 336, 336, generator=gen(target), dtype=torch.float64)
    for i in range(1):
        x, kept, counts = pruning_encoder(deep_tower, px[i : i + 1], m, 576)
        with torch.no_grad():
            ref_x, ref_kept = ref_flowcut(vm.encoder.layers, vm.pre_layrnorm(vm.embeddings(px[i : i + 1]))[0], nb, target)
        assert kept[0].tolist() == ref_kept
        torch.testing.assert_close(x[0], ref_x, rtol=1e-9, atol=1e-9)
        assert len(set(counts)) > 3 and counts[0] == 576  # the entropy rule cut at several blocks


def test_flowcut_entropy_cut_formula():
    from methods.flowcut import entropy_cut

    g = gen(9)
    a = torch.softmax(torch.randn(1, 500, generator=g, dtype=torch.float64) * 2, dim=-1)
    p = (a / a.sum()).flatten().tolist()
    ent = -sum(x * math.log(x) for x in p) / math.log(500)
    assert entropy_cut(a, 4, 64) == round((500 - 64) / 2 * (1 - ent**2))
    # a batch is cut by its maximum (official); the adapter runs one image at a time
    b = torch.cat([a, torch.full((1, 500), 1 / 500, dtype=torch.float64)])
    assert entropy_cut(b, 4, 64) == entropy_cut(a, 4, 64) and entropy_cut(b[1:], 4, 64) == 0


def test_flowcut_entropy_cut_never_negative_in_fp16():
    """Near-uniform fp16 attention (random weights, seen on the H100) rounds the entropy ratio above 1: the
    formula gives a negative cut, which would ask topk for more tokens than exist; it is clamped at 0."""
    from methods.flowcut import entropy_cut

    g = torch.Generator().manual_seed(97)
    a = (torch.full((1, 576), 1.0) + torch.rand(1, 576, generator=g) * 0.01).half()
    p = a / a.sum(dim=-1, keepdim=True)
    ratio = (-torch.xlogy(p, p).sum(dim=-1) / torch.log(torch.tensor(576))).item()
    assert ratio > 1  # the case itself: unclamped, (576 - 64) * (1 - ratio**2) rounds to -1
    assert round((576 - 64) * (1 - ratio**2)) < 0 and entropy_cut(a, 1, 64) == 0


def test_flowcut_end_to_end_per_sample(adapter, batch):
    from methods.flowcut import FlowCut

    m = FlowCut(prune_ratio=0.75)
    adapter.check_method(m)
    p = adapter.prepare(batch, m, torch.tensor([0, 1]))
    assert p.visual_tokens_kept == [144, 144]
    vt = p.extras["vision_tokens_per_layer"]
    assert len(vt) == 2 and vt[0][0] == 576
    assert adapter.generate(p, max_new_tokens=2, method=m).shape == (2, 2)
    one = adapter.prepare({k: v[1:] for k, v in batch.items()}, m, torch.tensor([1]))
    tok = p.inputs_embeds[1][p.input_ids[1] == adapter.image_token_id]
    tok1 = one.inputs_embeds[0][one.input_ids[0] == adapter.image_token_id]
    torch.testing.assert_close(tok, tok1, rtol=1e-5, atol=1e-5)
    assert one.extras["vision_tokens_per_layer"][0] == vt[1]
    full = adapter.prepare(batch, FlowCut(prune_ratio=0.0), torch.tensor([0, 1]))
    assert full.visual_tokens_kept == [576, 576]


@pytest.mark.parametrize("name", ["gprune", "holov"])
def test_graph_safe_selections_need_no_host_values(name):
    """On ``meta`` tensors every host read raises: the selections are CUDA-graph capturable (as
    ``test_vision_methods.test_graph_safe_selections_need_no_host_values``)."""
    m = WAVE2[name](0.9)
    assert m.graph_safe
    cls = torch.zeros(2, 4, 577, device="meta")
    ctx = VisionContext((24, 24), True, torch.zeros(2, dtype=torch.long), {"cls_attn:-2": lambda: cls})
    out = m.reduce(torch.zeros(2, 576, 64, device="meta"), ctx)
    assert out.features.device.type == "meta" and out.features.shape[:2] == (2, m.n_keep(576))
    assert out.n_kept.tolist() == [m.n_keep(576)] * 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("ratio", [0.6667, 0.8889])
@pytest.mark.parametrize("name", ["gprune", "holov"])
def test_graph_selection_equals_eager_cuda(name, ratio):
    """fp16 on CUDA: no host synchronisation in the eager selection, and the CUDA-graph replay the adapter
    runs gives the eager result bit for bit (also on new values through the same graph)."""
    from bench.models.clip_extras import GraphedSelection, build_extras
    from bench.models.llava import build_random_llava
    from bench.tiny_llava import build_config

    torch.manual_seed(0)
    model = build_random_llava(build_config({**SIZES, "text_layers": 1}), "cuda", torch.float16)
    m = WAVE2[name](ratio)
    px = torch.randn(3, 3, 336, 336, device="cuda", dtype=torch.float16, generator=torch.Generator(device="cuda").manual_seed(1))

    def tower(p):
        out = model.model.get_image_features(pixel_values=p, vision_feature_layer=-2, vision_feature_select_strategy="default", return_dict=True, output_hidden_states=True)
        f = out.pooler_output
        return (torch.stack(list(f)) if isinstance(f, (list, tuple)) else f), out.hidden_states

    with torch.no_grad():
        feats, hidden = tower(px)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            ref = m.reduce(feats, VisionContext((24, 24), True, torch.arange(3), build_extras(model, hidden, m.needs)))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        graphed = GraphedSelection(model, m, (24, 24), True)
        for _ in range(2):
            got = graphed(feats, hidden)
            assert torch.equal(got.features, ref.features) and torch.equal(got.n_kept, ref.n_kept)
            assert (got.kept_index is None) == (ref.kept_index is None)
            if ref.kept_index is not None:
                assert torch.equal(got.kept_index, ref.kept_index)
        feats2, hidden2 = tower(px.flip(0).contiguous())
        ref2 = m.reduce(feats2, VisionContext((24, 24), True, torch.arange(3), build_extras(model, hidden2, m.needs)))
        assert torch.equal(graphed(feats2, hidden2).features, ref2.features)


# ----------------------------------------------------------------------------- VScan
def cls_rows(b: int, heads: int, n: int, g, scale: float, dtype=torch.float64) -> torch.Tensor:
    """``(B, H, 1 + N)`` per-head softmax CLS rows, as ``cls_attn:L`` gives them."""
    return torch.softmax(torch.randn(b, heads, n + 1, generator=g, dtype=dtype) * scale, dim=-1)


def vscan_ctx(shallow_rows, deep_rows, grid=(24, 24)):
    b = shallow_rows.shape[0]
    return VisionContext(grid, True, torch.zeros(b, dtype=torch.long), {"cls_attn:5@24": lambda: shallow_rows, "cls_attn:-2": lambda: deep_rows})


@pytest.mark.parametrize("p", [96, 144, 58, 216, 432])
def test_vscan_selection_and_merge_match_reference(p):
    from reference_vision import ref_vscan

    from methods.vscan import VScan

    g = gen(p)
    x = clustered(2, 576, 48, g).double()
    sh, dp = cls_rows(2, 4, 576, g, 3.0), cls_rows(2, 4, 576, g, 2.0)
    m = VScan(prune_ratio=0.5, budget="official", visual_token_num=p)
    sel = m.reduce(x, vscan_ctx(sh, dp))
    local = (int(p * 0.5) // 16) * 16
    assert sel.n_kept.tolist() == [local + p - int(p * 0.5)] * 2  # no top-up: 144 keeps 64 + 72
    for i in range(2):
        kept, merged = ref_vscan(x[i], sh[i, :, 1:].mean(0), dp[i, :, 1:].mean(0), (24, 24), p)
        assert sel.kept_index[i].tolist() == kept
        torch.testing.assert_close(sel.features[i], merged, rtol=1e-12, atol=1e-12)


def test_vscan_budgets():
    from methods.vscan import VScan

    assert VScan(prune_ratio=1 - 64 / 576).counts(576) == (96, [32])  # the official setting is the layer mean of 64
    assert VScan(prune_ratio=0.75).counts(576) == (216, [72])
    assert VScan(prune_ratio=0.5).counts(576) == (432, [144])
    assert VScan(prune_ratio=0.9).counts(576) == (87, [29])
    assert VScan(prune_ratio=0.25).counts(576) == (576, [288])  # P capped at N: the LLM stage carries the mean
    assert VScan(prune_ratio=0.75, budget="after_prune").counts(576) == (144, [48])
    assert VScan(prune_ratio=0.5, budget="official").counts(576) == (96, [32])
    st = VScan(prune_ratio=1 - 64 / 576).plan_for(576, 96, 32)
    assert [(s.layer, s.n_keep, s.renumber) for s in st] == [(16, 32, True)]
    assert VScan(prune_ratio=0.5, budget="official", image_token_list=[120]).plan_for(576, 90, 32)[0].n_keep == 90  # min(32, present)
    assert VScan(prune_ratio=0.75).plan_for(576, 204, 8)[0].layer == 4
    assert VScan(prune_ratio=0.0).plan_for(576, 576, 32) == []


def _vscan_reference_logits(ad, embeds, span, layer_p, keep):
    """Batch 1, unpadded, layer by layer: before ``layer_p`` the last token's attention row from that
    layer's own norm, q/k and RoPE picks ``keep`` image tokens (physically kept, positions renumbered)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    lm = ad.model.model.language_model
    h, kept_rel = embeds, None
    pos = torch.arange(h.shape[1])
    s0, s1 = span
    for li, layer in enumerate(lm.layers):
        if li == layer_p:
            a, t = layer.self_attn, h.shape[1]
            x = layer.input_layernorm(h)
            hd = a.head_dim
            q = a.q_proj(x).view(1, t, -1, hd).transpose(1, 2)
            k = a.k_proj(x).view(1, t, -1, hd).transpose(1, 2)
            cos, sin = lm.rotary_emb(h, pos.view(1, -1))
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k = repeat_kv(k, q.shape[1] // k.shape[1])
            row = torch.softmax((q[:, :, -1:] @ k.transpose(-1, -2)) * hd**-0.5, dim=-1, dtype=torch.float32)
            score = row.mean(dim=1)[0, 0, s0:s1].tolist()
            kept_rel = sorted(sorted(range(s1 - s0), key=lambda j: -score[j])[:keep])
            h = torch.cat([h[:, :s0], h[:, [s0 + j for j in kept_rel]], h[:, s1:]], dim=1)
            pos = torch.arange(h.shape[1])
        pe = lm.rotary_emb(h, pos.view(1, -1))
        out = layer(h, attention_mask=None, position_ids=pos.view(1, -1), past_key_values=None, use_cache=False, position_embeddings=pe)
        h = out[0] if isinstance(out, tuple) else out
    return ad.model.lm_head(lm.norm(h)), kept_rel


def test_vscan_two_stages_on_tiny_llava(adapter, batch):
    """Pre-LLM: the tower's CLS rows and projected tokens through the rule; in the LLM: the hooked, cached
    prefill equals a layer-by-layer forward with the stage's tokens physically removed; batch == per sample."""
    from reference_vision import ref_vscan

    from bench.models.clip_extras import build_extras
    from methods.vscan import VScan

    m = VScan(prune_ratio=0.75)  # P = 216 (204 reach the LLM: 6 per window + 108), 72 from the stage on
    adapter.check_method(m)
    seeds = torch.tensor([0, 1])
    p = adapter.prepare(batch, m, seeds)
    assert p.visual_tokens_kept == [204, 204]
    feats, hidden = adapter.encode_images(batch["pixel_values"], output_hidden_states=True)
    ex = build_extras(adapter.model, hidden, m.needs)
    with torch.no_grad():
        sh, dp = ex["cls_attn:5@24"]()[:, :, 1:].mean(dim=1), ex["cls_attn:-2"]()[:, :, 1:].mean(dim=1)
    for i in range(2):
        kept, merged = ref_vscan(feats[i].double(), sh[i].double(), dp[i].double(), adapter.grid, 216)
        tok = p.inputs_embeds[i][p.input_ids[i] == adapter.image_token_id]
        torch.testing.assert_close(tok.double(), merged, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        logits = adapter.prefill(p, m).logits
    (stage,) = m.plan_for(576, 204, 2)
    assert p.extras["visual_tokens_per_layer"].tolist() == [[204] * stage.layer + [72] * (2 - stage.layer)] * 2
    kept_b = p.extras["llm_stages"][0]["kept_index"]
    gen_b = adapter.generate(p, max_new_tokens=3, method=m)
    for i in range(2):
        one = adapter.prepare({k: v[i : i + 1][:, batch["attention_mask"][i].bool()] if k != "pixel_values" else v[i : i + 1] for k, v in batch.items()}, m, seeds[i : i + 1])
        with torch.no_grad():
            l1 = adapter.prefill(one, m).logits
            ref, kept_rel = _vscan_reference_logits(adapter, one.inputs_embeds, one.extras["image_spans"][0].tolist(), stage.layer, 72)
        torch.testing.assert_close(l1[0, -1], ref[0, -1], rtol=1e-4, atol=1e-4)
        assert one.extras["llm_stages"][0]["kept_index"][0].tolist() == kept_rel == kept_b[i].tolist()
        torch.testing.assert_close(logits[i, -1], l1[0, -1], rtol=1e-4, atol=1e-4)
        single = adapter.generate(one, max_new_tokens=3, method=m)[0].tolist()
        assert gen_b[i].tolist()[: len(single)] == single


def test_vscan_ratio_zero_is_unpruned(adapter, batch):
    from methods.vscan import VScan

    m = VScan(prune_ratio=0.0)
    p = adapter.prepare(batch, m, torch.tensor([0, 1]))
    assert p.visual_tokens_kept == [576, 576]
    with torch.no_grad():
        assert torch.equal(adapter.prefill(p, m).logits, adapter.prefill(p).logits)


def test_vscan_matmul_merge_assigns_like_the_official_cosine():
    """The named ``merge_similarity: matmul`` deviation: in float64 (no last-bit ties) the same assignments."""
    from methods.vscan import VScan

    g = gen(21)
    x = clustered(2, 576, 64, g).double()
    ctx = vscan_ctx(cls_rows(2, 4, 576, g, 3.0), cls_rows(2, 4, 576, g, 2.0))
    a = VScan(prune_ratio=0.75).reduce(x, ctx)
    b = VScan(prune_ratio=0.75, merge_similarity="matmul").reduce(x, ctx)
    assert torch.equal(a.kept_index, b.kept_index)
    torch.testing.assert_close(a.features, b.features, rtol=1e-12, atol=1e-12)


def test_vscan_refuses_what_it_cannot_run():
    from bench.errors import ConfigError, IncompatibleMethodError
    from methods.vscan import VScan

    with pytest.raises(IncompatibleMethodError):
        VScan(prune_ratio=0.5).check_compatible(VisionContext((24, 24), False, torch.zeros(1)))
    with pytest.raises(IncompatibleMethodError, match="window"):
        VScan(prune_ratio=0.5).reduce(torch.zeros(1, 16, 8), vscan_ctx(cls_rows(1, 2, 16, gen(0), 1.0), cls_rows(1, 2, 16, gen(1), 1.0), (4, 4)))
    for bad in ({"merge_similarity": "dot"}, {"layer_list": [8, 16]}, {"window_size": 0}, {"budget": "mean"}):
        with pytest.raises(ConfigError):
            VScan(prune_ratio=0.5, **bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_vscan_cuda_equals_cpu():
    """float32 on CUDA: the kept indices of the CPU run, the merged features within float32 rounding (the
    official ``scatter_add_`` sums with atomics on CUDA)."""
    from methods.vscan import VScan

    g = gen(31)
    x = clustered(3, 576, 4096, g)
    sh, dp = cls_rows(3, 16, 576, g, 3.0, torch.float32), cls_rows(3, 16, 576, g, 2.0, torch.float32)
    m = VScan(prune_ratio=1 - 64 / 576)
    cpu = m.reduce(x, vscan_ctx(sh, dp))
    gpu = m.reduce(x.cuda(), vscan_ctx(sh.cuda(), dp.cuda()))
    assert torch.equal(gpu.kept_index.cpu(), cpu.kept_index) and cpu.n_kept.tolist() == [96] * 3
    torch.testing.assert_close(gpu.features.cpu(), cpu.features, rtol=1e-5, atol=1e-5)
