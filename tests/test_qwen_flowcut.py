"""FlowCut's Qwen port (``TungChintao/FlowCut``, ``FlowCut_Qwen/``) on a tiny random-config Qwen2.5-VL (CPU, float32):
a 4-block windowed tower (full attention at block 1) and a 4-layer LM, so that the tower cuts at an even remaining
depth and the LLM stage (scored in layer 1) prunes the input of layer 2.

References are loops written from the official ``Qwen2VisionTransformerPretrainedModel_forward``,
``VisionAttention_forward`` (eager, block-diagonal mask), ``compute_score_vit``, ``adaptive_prune_ratio`` and the
layer-1 ``relation_attn`` / ``semantic_attn`` of ``Qwen2VLSdpaAttention_forward`` (per head, ``bmm``).
"""

from __future__ import annotations

import math

import pytest
import torch

from bench.errors import IncompatibleMethodError
from methods.registry import create
from test_qwen25vl import IMG, make_batch, one_sample, seeds, tiny_qwen
from test_qwen_inllm import _stage_rows, manual_pruned_decode

#: patch grids: the 16 x 16 and 16 x 12 ones hold several 4 x 4-patch windows (the tower's window is 56 px)
FGRIDS = [(16, 16), (12, 16), (16, 12), (8, 8), (12, 12), (8, 16), (16, 10), (10, 8)]


@pytest.fixture(scope="module")
def adapter():
    from bench.models.qwen25vl import Qwen25VLAdapter

    a = Qwen25VLAdapter(name="tiny_qwen_fc", source="none", weights="random", device="cpu", dtype="float32")
    a.model = tiny_qwen(seed=4, vision_depth=4, llm_layers=4)
    with torch.no_grad():  # attention far from uniform, so that the entropy cuts before the last block are not 0
        for blk in a.model.model.visual.blocks:
            blk.attn.qkv.weight.mul_(30.0)
            blk.attn.qkv.bias.normal_(0, 3.0)
    return a


# ----------------------------------------------------------------------------- loop references (official code)
def ref_adaptive_prune_ratio(attn, rpl, target_num):
    n = attn.shape[-1]
    entropy = -torch.sum(attn * torch.log(attn + 1e-7), dim=-1)
    r = (n - target_num) / rpl**0.5 * (1 - (entropy / torch.log(torch.tensor(n))) ** 2)
    return int(r.round())


@torch.no_grad()
def ref_flowcut_tower(visual, px, thw, target):
    """The official tower loop on Qwen2.5-VL's tower: eager attention with a block-diagonal mask per segment (the
    image for a full-attention block, the survivors of each window otherwise), the official scores and cuts."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    index, cu_win = get_vision_window_index(thw, spatial_merge_size=2, window_size=visual.window_size, patch_size=14)
    win = []
    for w in range(len(cu_win) - 1):
        win += [w] * int(cu_win[w + 1] - cu_win[w])
    h = visual.patch_embed(px)
    n = h.shape[0]
    h = h.view(n // 4, 4, -1)[index].view(n, -1)
    cos, sin = visual.rotary_pos_emb(h, get_vision_position_ids(thw, 2))
    cos, sin = (x.view(n // 4, 4, -1)[index].view(n, -1) for x in (cos, sin))
    cum, counts = None, []
    total = len(visual.blocks)
    for idx, blk in enumerate(visual.blocks):
        cur = h.shape[0]
        counts.append(cur)
        at = blk.attn
        x = blk.norm1(h)
        q, k, v = at.qkv(x).reshape(cur, 3, at.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        mask = torch.full((1, cur, cur), torch.finfo(q.dtype).min)
        for a in range(cur):
            for b in range(cur):
                if idx in visual.fullatt_block_indexes or win[a] == win[b]:
                    mask[0, a, b] = 0
        w = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(at.head_dim) + mask, dim=-1, dtype=torch.float32)
        h = h + at.proj((w @ v).transpose(0, 1).reshape(cur, -1))
        h = h + blk.mlp(blk.norm2(h))
        # ======== FlowCut (official) ========
        global_q = q.mean(1, keepdim=True)
        attn = torch.softmax(torch.bmm(global_q, k.transpose(1, 2)) / math.sqrt(q.shape[-1]), dim=-1, dtype=torch.float32).mean(0)
        score = attn * torch.norm(v.mean(0), p=1, dim=-1)
        if cur > target:
            remain = total - idx - 1
            cum = score.squeeze(0) if cum is None else 0.5 * cum + 0.5 * score.squeeze(0)
            if not remain % 2:
                prune = ref_adaptive_prune_ratio(attn, remain, target) if remain else cur
                keep = torch.topk(cum, max(cur - prune, target), dim=0).indices.sort(dim=0).values
                cum, h, cos, sin = cum[keep], h[keep], cos[keep], sin[keep]
                win = [win[j] for j in keep.tolist()]
    return visual.merger(h), counts


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("ratio", [0.6, 0.8, 0.9])
def test_tower_cut_equals_the_official_loop(adapter, ratio):
    m = create("flowcut", ratio)
    adapter.check_method(m)
    assert (m.port, m.stage) == ("qwen25vl", "in_llm")
    visual = adapter.model.model.visual
    cut_before_last = 0
    for i, grid in enumerate(FGRIDS[:5]):
        batch = make_batch([grid], seed=i)
        feats, counts, _ = adapter.encode_flowcut(batch["pixel_values"], batch["image_grid_thw"], m)
        n = grid[0] * grid[1] // 4
        t = m.target(n)
        target = 8 * t  # official: visual.target_num = 2 target_num, target = visual.target_num * 4 patches
        assert m.qwen_tower_target(n, 4, 4) == target
        if 4 * n <= target:
            assert counts[0] == [4 * n] * 4 and feats[0].shape[0] == n
            continue
        ref, ref_counts = ref_flowcut_tower(visual, batch["pixel_values"], batch["image_grid_thw"], target)
        assert counts[0] == ref_counts and feats[0].shape[0] == 2 * t
        torch.testing.assert_close(feats[0], ref, rtol=1e-4, atol=1e-5)
        cut_before_last += ref_counts[-1] < ref_counts[0]
    if ratio >= 0.8:
        assert cut_before_last  # an entropy cut at an even remaining depth happened (the test exercises it)


def test_prune_count_is_the_official_formula_clamped_at_zero():
    from methods.flowcut_ports import qwen_prune_count

    g = torch.Generator().manual_seed(0)
    for rpl in (2, 4, 6):
        a = torch.softmax(torch.randn(1, 50, generator=g) * 3, dim=-1)
        assert qwen_prune_count(a, rpl, 12) == ref_adaptive_prune_ratio(a, rpl, 12)
    flat = torch.full((1, 40), 1 / 40)  # entropy ratio at (or, rounded, above) 1: the official count is <= 0
    assert qwen_prune_count(flat, 2, 10) == max(ref_adaptive_prune_ratio(flat, 2, 10), 0)


@torch.no_grad()
def test_llm_stage_equals_the_official_rule_and_physical_removal(adapter):
    """Layer 1's last-token relation and semantic attention over the image (official, per head), topk(target_num),
    sorted; decoding equals the hand-run decoder with the other image tokens removed from layer 2 on."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb

    m = create("flowcut", 0.8)
    lm = adapter.model.model.language_model
    for i, grid in enumerate(FGRIDS[:4]):
        one = one_sample(make_batch([grid], seed=i), 0)
        prepared = adapter.prepare(one, m, seeds(1))
        ours = adapter.generate(prepared, max_new_tokens=5, method=m)[0].tolist()
        (st,) = prepared.extras["llm_stages"]
        s0, s1 = prepared.extras["image_spans"][0].tolist()
        n_vis, t_num = s1 - s0, m.target(grid[0] * grid[1] // 4)
        assert st["layer"] == 2 and st["n_keep"] == t_num and n_vis == min(grid[0] * grid[1] // 4, 2 * t_num)
        pos = prepared.extras["position_ids"]
        h = prepared.inputs_embeds
        pe = lm.rotary_emb(h, pos)
        h = lm.layers[0](h, attention_mask=None, position_embeddings=pe, position_ids=None)
        at = lm.layers[1].self_attn
        x = lm.layers[1].input_layernorm(h)
        t = x.shape[1]
        q = at.q_proj(x).view(1, t, -1, at.head_dim).transpose(1, 2)
        k = at.k_proj(x).view(1, t, -1, at.head_dim).transpose(1, 2)
        v = at.v_proj(x).view(1, t, -1, at.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *pe)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1)[0], v.repeat_interleave(rep, dim=1)[0]  # repeat_kv: (H, T, d)
        vis_k, vis_v = k[:, s0:s1], v[:, s0:s1]
        rel = torch.softmax(torch.bmm(q[0, :, -1:], vis_k.transpose(1, 2)) / math.sqrt(at.head_dim), dim=-1, dtype=torch.float32).mean(0)
        sem = torch.softmax(torch.bmm(v[:, -1:], vis_v.transpose(1, 2)) / math.sqrt(at.head_dim), dim=-1, dtype=torch.float32).mean(0)
        score = (rel + sem) * torch.norm(vis_v.mean(0), p=1, dim=-1)
        want = torch.topk(score, t_num, dim=1).indices.sort().values[0].tolist()
        assert st["kept_rel"][0].tolist() == want
        toks = manual_pruned_decode(adapter.model, prepared.inputs_embeds, pos, _stage_rows([st], s0, n_vis, t), 5)
        assert ours[: len(toks)] == toks


def test_positions_after_a_tower_cut_are_the_image_blocks_first_ones(adapter):
    """Official ``position_ids[:, :, first:first + image_embeds.shape[0]]``: the merged tokens of a cut tower take the
    first positions of the image block; the text after the image keeps its own."""
    m = create("flowcut", 0.8)
    batch = make_batch(FGRIDS[:3])
    prepared = adapter.prepare(batch, m, seeds(3))
    pos_full = adapter.rope_positions(batch)
    for i in range(3):
        at = (batch["input_ids"][i] == IMG).nonzero().flatten()
        s0, s1 = prepared.extras["image_spans"][i].tolist()
        assert s1 - s0 < len(at)
        assert torch.equal(prepared.extras["position_ids"][:, i, s0:s1], pos_full[:, i, at[: s1 - s0]])
        assert torch.equal(prepared.extras["position_ids"][:, i, -1], pos_full[:, i, -1])


def test_batch_of_8_mixed_sizes_equals_batch_of_1(adapter):
    m = create("flowcut", 0.8)
    batch = make_batch(FGRIDS)
    prepared = adapter.prepare(batch, m, seeds(8))
    together = adapter.generate(prepared, max_new_tokens=4, method=m)
    for i in range(8):
        p1 = adapter.prepare(one_sample(batch, i), m, seeds(8)[i:i + 1])
        alone = adapter.generate(p1, max_new_tokens=4, method=m)[0].tolist()
        assert together[i].tolist()[: len(alone)] == alone
        assert prepared.extras["visual_tokens_per_layer"][i].tolist() == p1.extras["visual_tokens_per_layer"][0].tolist()
        assert prepared.extras["vision_tokens_per_layer"][i] == p1.extras["vision_tokens_per_layer"][0]


def test_ratio_zero_is_the_unpruned_model_bit_for_bit(adapter):
    one = one_sample(make_batch(FGRIDS[:1]), 0)
    with torch.no_grad():
        full = adapter.model(**one, logits_to_keep=1)
    m = create("flowcut", 0.0)
    assert torch.equal(adapter.prefill(adapter.prepare(one, m, seeds(1)), m).logits, full.logits)


def test_budget_modes(adapter):
    n, layers = 64, 28
    official = create("flowcut", 0.75, port="qwen25vl")
    assert official.planned_counts(n, layers) == [32, 32] + [16] * 26  # 2 target_num in the tower, target_num after layer 1
    mean = create("flowcut", 0.75, port="qwen25vl", budget="layer_mean")
    got = sum(mean.planned_counts(n, layers)) / layers
    assert abs(got - 16) <= 1.0
    mean.check_budget(n, layers)


def test_refusals(adapter):
    with pytest.raises(IncompatibleMethodError, match="port"):
        adapter.check_method(create("flowcut", 0.5, port="llava"))
    from methods.base import VisionContext

    with pytest.raises(IncompatibleMethodError, match="qwen25vl"):
        create("flowcut", 0.5, port="qwen25vl").check_compatible(VisionContext((24, 24), True, torch.zeros(1)))
    clip = create("flowcut", 0.5)  # the CLIP rule (port auto on a [CLS] tower): pre-LLM budget convention, no budget modes
    assert clip.stage == "in_vision" and clip.budget_mode == "in_vision_exact" and clip.plan(576, 32) == []
    with pytest.raises(IncompatibleMethodError, match="Qwen2.5-VL port only"):
        create("flowcut", 0.5, budget="layer_mean").check_compatible(VisionContext((24, 24), True, torch.zeros(1)))
    from test_qwen25vl import tiny_qwen

    from bench.models.qwen25vl import Qwen25VLAdapter

    two = Qwen25VLAdapter(name="tiny_qwen", source="none", weights="random", device="cpu", dtype="float32")
    two.model = tiny_qwen()  # a 2-layer LM: no layer after the scoring layer 1
    with pytest.raises(IncompatibleMethodError, match="budget"):
        two.check_method(create("flowcut", 0.75))


def test_analytic_flops_equal_the_counter(adapter):
    """The cut tower counted block by block on its attention segments (windows of survivors), the merger on the
    merged tokens, the selection's global-query rows and the LLM stage's two rows, the layers on their tokens."""
    from bench.measure.flops import analytic_adapter, count_flops

    batch = adapter.probe_batch(batch_size=2, size=(224, 224))
    m = create("flowcut", 0.8)
    adapter.check_method(m)
    prepared = adapter.prepare(batch, m, seeds(2))
    assert all(s is not None for s in prepared.extras["vision_segments"])  # the tower cut
    counted, _ = count_flops(lambda: adapter.prefill(prepared, m))
    got = analytic_adapter(adapter, m, prepared, batch)
    assert got.selection > 0
    assert got.vision + got.projector + got.llm + got.lm_head + got.selection == pytest.approx(
        count_flops(lambda: adapter.prepare(batch, m, seeds(2)))[0] + counted, rel=1e-9)
