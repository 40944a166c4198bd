"""VScan's Qwen2.5-VL port (``Tencent/SelfEvolvingAgent``, ``VScan/qwen/model``) on a tiny random-config
Qwen2.5-VL with a 3-block tower (full attention at block 1, so the local and global scans read different blocks).

Loop references are written from the official ``window_selection``, ``token_merging`` and ``layer_prune``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bench.errors import IncompatibleMethodError
from methods.registry import create
from methods.vscan import window_greedy_picks
from test_qwen25vl import IMG, make_batch, one_sample, seeds, tiny_qwen
from test_qwen_inllm import _stage_rows, manual_pruned_decode
from test_qwen_ports import ref_received_attention

#: patch grids; merged grids of at least 4 x 4 (one local-scan window), leftover rows / columns included
VGRIDS = [(8, 8), (8, 12), (12, 8), (16, 10), (12, 12), (16, 12), (10, 16), (18, 14)]


@pytest.fixture(scope="module")
def adapter():
    from bench.models.qwen25vl import Qwen25VLAdapter

    a = Qwen25VLAdapter(name="tiny_qwen3", source="none", weights="random", device="cpu", dtype="float32")
    a.model = tiny_qwen(seed=2, vision_depth=3, llm_layers=2)
    with torch.no_grad():  # attention far from uniform
        for blk in a.model.model.visual.blocks:
            blk.attn.qkv.weight.mul_(20.0)
    return a


def ref_window_selection(attn: list[float], h: int, w: int, k: int, window: int = 4) -> list[int]:
    """The official ``window_selection`` loop."""
    nwh, nww = h // window, w // window
    limit = math.ceil(k / (nwh * nww))
    count = [[0] * nww for _ in range(nwh)]
    order = sorted(range(len(attn)), key=lambda j: (-attn[j], j))
    out = []
    for idx in order:
        x = min((idx // w) // window, nwh - 1)
        y = min((idx % w) // window, nww - 1)
        if count[x][y] < limit:
            count[x][y] += 1
            out.append(idx)
        if len(out) >= k:
            break
    return out


def ref_token_merging(x: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """Official ``token_merging`` (scaling 1), one dropped token at a time."""
    kept = [x[j].clone() for j in keep]
    counts = [1] * len(keep)
    for j in range(x.shape[0]):
        if j in keep:
            continue
        sims = [float(F.cosine_similarity(x[j], x[i], dim=0)) for i in keep]
        best = max(range(len(keep)), key=lambda t: (sims[t], -t))
        kept[best] = kept[best] + x[j]
        counts[best] += 1
    return torch.stack([v / c for v, c in zip(kept, counts)])


@pytest.mark.parametrize("grid,k", [((6, 6), 4), ((5, 9), 7), ((8, 4), 5), ((9, 7), 11), ((4, 4), 3)])
def test_window_greedy_picks_equal_the_official_loop(grid, k):
    g = torch.Generator().manual_seed(k)
    for _ in range(5):
        attn = torch.rand(2, grid[0] * grid[1], generator=g)
        got = window_greedy_picks(attn, grid, k, 4)
        for b in range(2):
            assert got[b].tolist() == ref_window_selection(attn[b].tolist(), *grid, k)


def test_scores_are_the_received_attention_of_the_first_full_and_last_blocks(adapter):
    batch = make_batch([(12, 16)])
    keys = ("merged_attn_received@first_full:raster", "merged_attn_received:raster")
    _, extras = adapter.encode_images(batch["pixel_values"], batch["image_grid_thw"], keys)
    from transformers.vision_utils import get_vision_window_index

    index, _ = get_vision_window_index(batch["image_grid_thw"], spatial_merge_size=2, window_size=56, patch_size=14)
    back = torch.argsort(index)
    for key, block in zip(keys, (1, 2)):
        ref = torch.tensor(_ref_block(adapter, batch, block))[back]
        torch.testing.assert_close(extras[0][key][0], ref, rtol=1e-5, atol=1e-9)
    assert not torch.equal(extras[0][keys[0]], extras[0][keys[1]])


def _ref_block(adapter, batch, block):
    return ref_received_attention(adapter, batch["pixel_values"], batch["image_grid_thw"], block)


@pytest.mark.parametrize("budget", ["layer_mean", "official", "after_prune"])
def test_pre_llm_scan_and_merge_equal_the_official_loops(adapter, budget):
    m = create("vscan", 0.6, budget=budget)
    adapter.check_method(m)
    assert m.port == "qwen25vl"
    keys = ("merged_attn_received@first_full:raster", "merged_attn_received:raster")
    for i, grid in enumerate(VGRIDS):
        batch = make_batch([grid], seed=i)
        feats, extras = adapter.encode_images(batch["pixel_values"], batch["image_grid_thw"], keys)
        x, local, glob = feats[0], extras[0][keys[0]][0], extras[0][keys[1]][0]
        h, w = grid[0] // 2, grid[1] // 2
        n = h * w
        k = int(0.167 * n) if budget == "official" else m.qwen_pre_count(n)
        if budget == "official":
            assert m.qwen_pre_count(n) == max(1, k)
            k = max(1, k)
        loc = ref_window_selection(local.tolist(), h, w, k // 2)
        g = glob.clone()
        g[loc] = 0
        keep = sorted(loc + g.topk(k - k // 2).indices.tolist())
        sel = m.reduce(x.unsqueeze(0), adapter.image_context((h, w), seeds(1), extras[0]))
        assert sel.kept_index[0].tolist() == keep
        torch.testing.assert_close(sel.features[0], ref_token_merging(x, keep), rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_generate_equals_physical_removal_with_the_unrotated_stage(adapter):
    """Pre-LLM: kept (merged) tokens at their own 3-D positions; stage: the layer's un-rotated q/k of the last token,
    head mean over the image, topk(int(0.333 n)), sorted; positions kept."""
    m = create("vscan", 0.5)
    lm = adapter.model.model.language_model
    batch = make_batch(VGRIDS[:4])
    for i in range(4):
        one = one_sample(batch, i)
        prepared = adapter.prepare(one, m, seeds(1))
        ours = adapter.generate(prepared, max_new_tokens=5, method=m)[0].tolist()
        (st,) = prepared.extras["llm_stages"]
        s0, s1 = prepared.extras["image_spans"][0].tolist()
        assert st["n_keep"] == max(1, int(0.333 * (s1 - s0)))
        pos = prepared.extras["position_ids"]
        # the stage's rule by hand, on the input of its layer
        h = prepared.inputs_embeds
        pe = lm.rotary_emb(h, pos)
        for layer in lm.layers[: st["layer"]]:
            h = layer(h, attention_mask=None, position_embeddings=pe, position_ids=None)
        at = lm.layers[st["layer"]].self_attn
        x = lm.layers[st["layer"]].input_layernorm(h)
        t = x.shape[1]
        q = at.q_proj(x).view(t, -1, at.head_dim)[-1]  # (H, d) last token, no RoPE
        k = at.k_proj(x).view(t, -1, at.head_dim)
        rep = q.shape[0] // k.shape[1]
        scores = [0.0] * (s1 - s0)
        for hh in range(q.shape[0]):
            row = torch.softmax(k[:, hh // rep] @ q[hh] * at.scaling, dim=0)
            for j in range(s1 - s0):
                scores[j] += float(row[s0 + j]) / q.shape[0]
        want = sorted(sorted(range(len(scores)), key=lambda j: -scores[j])[: st["n_keep"]])
        assert st["kept_rel"][0].tolist() == want
        toks = manual_pruned_decode(adapter.model, prepared.inputs_embeds, pos, _stage_rows([st], s0, s1 - s0, t), 5)
        assert ours[: len(toks)] == toks


def test_kept_tokens_keep_their_3d_positions(adapter):
    m = create("vscan", 0.5)
    batch = make_batch(VGRIDS[:3])
    prepared = adapter.prepare(batch, m, seeds(3))
    pos_full = adapter.rope_positions(batch)
    keys = ("merged_attn_received@first_full:raster", "merged_attn_received:raster")
    for i, grid in enumerate(VGRIDS[:3]):
        one = one_sample(batch, i)
        feats, extras = adapter.encode_images(one["pixel_values"], one["image_grid_thw"], keys)
        keep = m.reduce(feats[0].unsqueeze(0), adapter.image_context((grid[0] // 2, grid[1] // 2), seeds(1), extras[0])).kept_index[0]
        at = (batch["input_ids"][i] == IMG).nonzero().flatten()
        s0, s1 = prepared.extras["image_spans"][i].tolist()
        assert torch.equal(prepared.extras["position_ids"][:, i, s0:s1], pos_full[:, i, at[keep]])


def test_batch_of_8_mixed_sizes_equals_batch_of_1(adapter):
    m = create("vscan", 0.5)
    batch = make_batch(VGRIDS)
    prepared = adapter.prepare(batch, m, seeds(8))
    together = adapter.generate(prepared, max_new_tokens=4, method=m)
    for i in range(8):
        p1 = adapter.prepare(one_sample(batch, i), m, seeds(8)[i:i + 1])
        alone = adapter.generate(p1, max_new_tokens=4, method=m)[0].tolist()
        assert together[i].tolist()[: len(alone)] == alone
        assert prepared.extras["visual_tokens_per_layer"][i].tolist() == p1.extras["visual_tokens_per_layer"][0].tolist()


def test_ratio_zero_is_the_unpruned_model_bit_for_bit(adapter):
    one = one_sample(make_batch(VGRIDS[1:2]), 0)
    with torch.no_grad():
        full = adapter.model(**one, logits_to_keep=1)
    m = create("vscan", 0.0)
    assert torch.equal(adapter.prefill(adapter.prepare(one, m, seeds(1)), m).logits, full.logits)


def test_ports_are_refused_on_the_other_family(adapter):
    auto = create("vscan", 0.5)
    assert auto.resolved_options() == {"port": "llava"}  # what runs where no adapter resolves auto (LLaVA)
    adapter.check_method(auto)
    assert auto.resolved_options() == {"port": "qwen25vl"} and create("divprune", 0.5).resolved_options() == {}
    with pytest.raises(IncompatibleMethodError, match="port"):
        adapter.check_method(create("vscan", 0.5, port="llava"))
    from methods.base import VisionContext

    with pytest.raises(IncompatibleMethodError, match="qwen25vl"):
        create("vscan", 0.5, port="qwen25vl").check_compatible(VisionContext((24, 24), True, torch.zeros(1)))
    with pytest.raises(IncompatibleMethodError, match="window"):  # a merged grid smaller than one 4 x 4 window
        adapter.prepare(make_batch([(6, 10)]), create("vscan", 0.5), seeds(1))
