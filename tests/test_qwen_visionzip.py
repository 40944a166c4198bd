"""VisionZip on a tiny random-config Qwen2.5-VL (CPU, float32): the no-[CLS] port of :mod:`methods.visionzip_ports`.

The port follows ModelTC/LightCompress's Qwen2.5-VL VisionZip (the JIA-Lab official Qwen code cannot be read
here). References below are loops written from that code: its score (the last block's full softmax, head mean,
*summed* over queries, ``view(N, 4).mean``, window order reversed), its keys (``view(H, N, 4, d).mean(2)``,
reversed, head mean), its dominant ``topk`` and contextual merge on the merged tokens, each contextual token
written at its target's row (so at the target's 3-D position). Then the adapter contract: ratio 0, physical
removal, batch 8 == batch 1, positions, FLOPs against the counter.
"""

from __future__ import annotations

import pytest
import torch

from methods.registry import create
from test_qwen25vl import IMG, make_batch, manual_decode, one_sample, seeds, tiny_qwen
from test_qwen_ports import HGRIDS, ref_window_order

KEYS = ("merged_attn_received_sum:raster", "merged_keys:raster")


@pytest.fixture(scope="module")
def adapter():
    from bench.models.qwen25vl import Qwen25VLAdapter

    a = Qwen25VLAdapter(name="tiny_qwen", source="none", weights="random", device="cpu", dtype="float32")
    a.model = tiny_qwen(seed=4, vision_depth=2)
    with torch.no_grad():  # attention far from uniform
        for blk in a.model.model.visual.blocks:
            blk.attn.qkv.weight.mul_(25.0)
    return a


def ref_scores_and_keys(adapter, px, thw, h, w):
    """LightCompress: ``attn (H, L, L)`` of the last block under its mask, ``mean(0).sum(0)``, ``view(N, 4).mean(-1)``
    and keys ``view(H, N, 4, d).mean(2)``, both from window to raster order, keys then averaged over heads."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    visual = adapter.model.model.visual
    got = {}
    hk = visual.blocks[-1].attn.register_forward_pre_hook(lambda m, a, k: got.update(x=a[0] if a else k["hidden_states"], **k), with_kwargs=True)
    with torch.no_grad():
        adapter.model.model.get_image_features(px, thw)
    hk.remove()
    at = visual.blocks[-1].attn
    x, cu = got["x"], got["cu_seqlens"].tolist()
    n = x.shape[0]
    with torch.no_grad():
        q, k, _ = at.qkv(x).reshape(n, 3, at.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, *got["position_embeddings"])
        mask = torch.full((n, n), float("-inf"))
        for s, e in zip(cu[:-1], cu[1:]):
            mask[s:e, s:e] = 0
        p = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) * at.scaling + mask, dim=-1)
        col = p.mean(dim=0).sum(dim=0)
        kh = k.transpose(0, 1)  # (H, L, d)
    order = ref_window_order(h // 2, w // 2, adapter.config.vision_config.window_size // 28)
    m = n // 4
    score = [0.0] * m
    keys = [None] * m
    for j in range(m):  # j-th merged token in window order is raster token order[j]
        score[order[j]] = float(col[4 * j: 4 * j + 4].mean())
        keys[order[j]] = kh[:, 4 * j: 4 * j + 4].mean(dim=1).mean(dim=0)
    return torch.tensor(score), torch.stack(keys)


def ref_visionzip_qwen(x, score, keys, d, c):
    """One image: ``x (N, C)`` merged tokens -> (rows in raster order of their positions, positions)."""
    n = x.shape[0]
    dom = set(score.topk(d).indices.tolist())
    rest = [j for j in range(n) if j not in dom]
    rows = {j: x[j] for j in dom}
    if c > 0 and rest:
        step = max(1, len(rest) // c)
        tpos = list(range(0, len(rest), step))[:c]
        targets = [rest[p] for p in tpos]
        others = [rest[p] for p in range(len(rest)) if p not in set(tpos)]
        kn = {j: keys[j] / keys[j].norm() for j in rest}
        groups = {t: [] for t in targets}
        for j in others:
            sims = [float(kn[j] @ kn[t]) for t in targets]
            groups[targets[max(range(len(targets)), key=lambda i: (sims[i], -i))]].append(j)
        for t in targets:
            g = groups[t]
            rows[t] = x[t] + (torch.stack([x[j] for j in g]).sum(0) / len(g) if g else torch.zeros_like(x[t]))
    pos = sorted(rows)
    return torch.stack([rows[j] for j in pos]), pos


def test_scores_and_keys_match_the_lightcompress_computation(adapter):
    for h, w in HGRIDS[:4]:
        batch = make_batch([(h, w)])
        _, extras = adapter.encode_images(batch["pixel_values"], batch["image_grid_thw"], KEYS)
        score, keys = ref_scores_and_keys(adapter, batch["pixel_values"], batch["image_grid_thw"], h, w)
        torch.testing.assert_close(extras[0][KEYS[0]][0], score, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(extras[0][KEYS[1]][0], keys, rtol=1e-5, atol=1e-6)
        assert abs(float(score.sum()) * 4 - (h * w)) < 1e-3  # column sums of a row-stochastic L x L, /4 per merge unit


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.778, 0.9])
def test_selection_equals_the_reference_loop(adapter, ratio):
    m = create("visionzip", ratio)
    for i, (h, w) in enumerate(HGRIDS):
        batch = make_batch([(h, w)], seed=i)
        feats, extras = adapter.encode_images(batch["pixel_values"], batch["image_grid_thw"], KEYS)
        x = feats[0]
        d, c = m.counts(x.shape[0])
        sel = m.reduce(x.unsqueeze(0), adapter.image_context((h // 2, w // 2), seeds(1), extras[0]))
        rows, pos = ref_visionzip_qwen(x, extras[0][KEYS[0]][0], extras[0][KEYS[1]][0], d, c)
        assert sel.extras["source_index"][0].tolist() == pos
        assert int(sel.n_kept[0]) == len(pos) == m.n_keep(x.shape[0])
        torch.testing.assert_close(sel.features[0], rows, rtol=1e-6, atol=1e-6)


def test_ratio_zero_is_the_unpruned_model_bit_for_bit(adapter):
    one = make_batch(HGRIDS[1:2])
    with torch.no_grad():
        full = adapter.model(**one, logits_to_keep=1)
    assert torch.equal(adapter.prefill(adapter.prepare(one, create("visionzip", 0.0), seeds(1))).logits, full.logits)


def _reference(adapter, batch, i, m, steps):
    """Physical removal: the unpruned prompt's embeddings with the image block replaced by the reference rows at
    their own rows (contextual tokens at their targets'), other image rows deleted, get_rope_index positions."""
    with torch.no_grad():
        pos_full, _ = adapter.model.model.get_rope_index(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                                                        image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"])
    offs = [0] + batch["image_grid_thw"].prod(-1).cumsum(0).tolist()
    h, w = batch["image_grid_thw"][i, 1:].tolist()
    px, thw = batch["pixel_values"][offs[i]:offs[i + 1]], batch["image_grid_thw"][i:i + 1]
    score, keys = ref_scores_and_keys(adapter, px, thw, h, w)
    with torch.no_grad():
        x = adapter.model.model.get_image_features(px, thw).pooler_output[0]
    d, c = m.counts(x.shape[0])
    rows, idx = ref_visionzip_qwen(x, score, keys, d, c)
    valid = batch["attention_mask"][i].bool()
    seq = batch["input_ids"][i][valid]
    emb = adapter.model.get_input_embeddings()(seq).detach()
    at = (seq == IMG).nonzero().flatten()
    pos = pos_full[:, i][:, valid]
    parts = [emb[: int(at[0])], rows, emb[int(at[-1]) + 1:]]
    cols = list(range(int(at[0]))) + [int(at[j]) for j in idx] + list(range(int(at[-1]) + 1, len(seq)))
    with torch.no_grad():
        return manual_decode(adapter.model, torch.cat(parts).unsqueeze(0), pos[:, cols].unsqueeze(1), steps), idx


@pytest.mark.parametrize("ratio", [0.5, 0.778])
def test_pruned_generate_equals_physical_removal(adapter, ratio):
    batch = make_batch(HGRIDS[:3])
    m = create("visionzip", ratio)
    adapter.check_method(m)
    prepared = adapter.prepare(batch, m, seeds(3))
    ours = adapter.generate(prepared, max_new_tokens=5)
    pos_full = adapter.rope_positions(batch)
    for i in range(3):
        toks, idx = _reference(adapter, batch, i, m, 5)
        assert prepared.visual_tokens_kept[i] == len(idx)
        assert ours[i].tolist()[: len(toks)] == toks
        s0, s1 = prepared.extras["image_spans"][i].tolist()
        at = (batch["input_ids"][i] == IMG).nonzero().flatten()
        assert torch.equal(prepared.extras["position_ids"][:, i, s0:s1], pos_full[:, i, at[torch.tensor(idx)]])


def test_batch_of_8_equals_batch_of_1(adapter):
    batch = make_batch(HGRIDS)
    m = create("visionzip", 0.6)
    prepared = adapter.prepare(batch, m, seeds(8))
    together = adapter.generate(prepared, max_new_tokens=4)
    for i in range(8):
        p1 = adapter.prepare(one_sample(batch, i), m, seeds(8)[i:i + 1])
        s0, s1 = prepared.extras["image_spans"][i].tolist()
        t0, t1 = p1.extras["image_spans"][0].tolist()
        assert torch.equal(prepared.inputs_embeds[i, s0:s1], p1.inputs_embeds[0, t0:t1])
        assert torch.equal(prepared.extras["position_ids"][:, i, s0:s1], p1.extras["position_ids"][:, 0, t0:t1])
        assert together[i].tolist() == adapter.generate(p1, max_new_tokens=4)[0].tolist()


def test_analytic_flops_equal_the_counter(adapter):
    """The received-attention pass (q, k, v recomputed, L x L scores), the key cosines and merge sums, then the LLM."""
    from bench.measure.flops import analytic_adapter, count_flops

    batch = adapter.probe_batch(batch_size=2, size=(224, 224))
    m = create("visionzip", 0.778)
    adapter.check_method(m)
    prepared = adapter.prepare(batch, m, seeds(2))
    counted, _ = count_flops(lambda: adapter.prefill(prepared, m))
    got = analytic_adapter(adapter, m, prepared, batch)
    assert got.selection > 0
    assert got.vision + got.projector + got.llm + got.lm_head + got.selection == pytest.approx(
        count_flops(lambda: adapter.prepare(batch, m, seeds(2)))[0] + counted, rel=1e-9)


def test_other_cls_methods_stay_refused(adapter):
    from bench.errors import IncompatibleMethodError

    adapter.check_method(create("visionzip", 0.778))
    for name in ("fastervlm", "vispruner", "prumerge"):
        with pytest.raises(IncompatibleMethodError):
            adapter.check_method(create(name, 0.5))
