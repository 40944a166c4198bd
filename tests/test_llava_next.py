"""LLaVA-NeXT adapter on a tiny random-config ``LlavaNextForConditionalGeneration`` (CPU, float32).

Tiles are 56 px / patch 14 (4 x 4 = 16 tokens per tile); the pinpoints give 2 or 4 anyres crops, and the
image sizes below make unpadding cut rows or columns, so token counts differ per sample.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from bench.errors import IncompatibleMethodError
from methods.registry import create

PAD, IMG, EOS = 0, 127, 2
SIZES = [(100, 60), (56, 112), (112, 112), (90, 100), (60, 110), (112, 56), (70, 70), (100, 101)]


def tiny_llava_next(seed: int = 0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14, projection_dim=32)
    tc = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                     pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS)
    cfg = LlavaNextConfig(vision_config=vc, text_config=tc, image_token_index=IMG, image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]],
                          vision_feature_layer=-2, vision_feature_select_strategy="default")
    cfg.pad_token_id = PAD
    for c in (cfg, vc, tc):
        c._attn_implementation = "sdpa"
    model = LlavaNextForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # a random newline of the init's scale; make it distinguishable from image tokens
        model.model.image_newline.normal_()
    return model


@pytest.fixture(scope="module")
def adapter():
    from bench.models.llava_next import LlavaNextAdapter

    a = LlavaNextAdapter(name="tiny_next", source="none", weights="random", device="cpu", dtype="float32")
    a.model = tiny_llava_next()
    return a


def make_batch(adapter, sizes, seed=0):
    """Left-padded prompts (random text of varying length around each image's packed placeholder count)."""
    g = torch.Generator().manual_seed(seed)
    rows, pix = [], []
    for i, (h, w) in enumerate(sizes):
        size = torch.tensor([h, w])
        tiles = adapter._num_tiles(size)
        n = len(adapter.source_map(size, tiles))
        before, after = 3 + i % 3, 4 + (i * 2) % 5
        text = torch.randint(3, IMG, (before + after,), generator=g)
        rows.append(torch.cat([text[:before], torch.full((n,), IMG), text[before:]]))
        p = torch.randn(5, 3, 56, 56, generator=g)
        p[tiles:] = 0
        pix.append(p)
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), PAD)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, t - len(r):] = r
        mask[i, t - len(r):] = 1
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.stack(pix), "image_sizes": torch.tensor(sizes)}


def one_sample(batch, i):
    """Sample ``i`` of a :func:`make_batch` batch as a batch of one (its left padding dropped)."""
    one = {k: v[i:i + 1] for k, v in batch.items()}
    one["input_ids"] = one["input_ids"][:, batch["attention_mask"][i].bool()]
    one["attention_mask"] = torch.ones_like(one["input_ids"])
    return one


def seeds(n):
    return torch.arange(n, dtype=torch.long) + 11


def test_layout_varies_per_image_and_matches_transformers(adapter):
    batch = make_batch(adapter, SIZES[:4])
    layout = adapter.visual_layout(batch)
    counts = [blocks[0].length for blocks in layout]
    assert len(set(counts)) > 1  # unpadding: a count per image
    packed = adapter.encode_images(batch["pixel_values"], batch["image_sizes"])
    assert [f.shape[0] for f in packed] == counts
    for i, f in enumerate(packed):  # newline rows are the model's image_newline, the rest image features
        src = adapter.source_map(batch["image_sizes"][i], adapter._num_tiles(batch["image_sizes"][i]))
        nl = adapter.model.model.image_newline
        assert torch.equal(f[src < 0], nl.expand(int((src < 0).sum()), -1))
        assert not (f[src >= 0] == nl).all(-1).any()
        assert layout[i][0].grids[0] == (4, 4)


def test_ratio_zero_is_the_unpruned_model_bit_for_bit(adapter):
    batch = make_batch(adapter, SIZES[:3])
    prepared = adapter.prepare(batch, create("divprune", 0.0), seeds(3))
    ours = adapter.generate(prepared, max_new_tokens=6)
    ref = adapter.model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=PAD)[:, batch["input_ids"].shape[1]:]
    assert torch.equal(ours, ref)
    out = adapter.prefill(prepared)
    pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # generate's positions under left padding
    with torch.no_grad():
        full = adapter.model(**batch, position_ids=pos, logits_to_keep=1)
    assert torch.equal(out.logits, full.logits)


@pytest.mark.parametrize("budget", ["image", "tile"])
@pytest.mark.parametrize("method", ["divprune", "random"])
def test_pruned_generate_equals_physical_removal(adapter, budget, method):
    adapter.budget = budget
    try:
        batch = make_batch(adapter, SIZES[:2])
        m = create(method, 0.75)
        prepared = adapter.prepare(batch, m, seeds(2))
        ours = adapter.generate(prepared, max_new_tokens=5)
        packed = adapter.encode_images(batch["pixel_values"], batch["image_sizes"])
        for i in range(2):
            size = batch["image_sizes"][i]
            src = adapter.source_map(size, adapter._num_tiles(size))
            # the reference: the full packed sequence, with the method's picks made per budget unit here
            keep = (src < 0).clone()
            for pos, grid in adapter.segments(src):
                from methods.base import VisionContext

                idx = m.select(packed[i][pos].unsqueeze(0), VisionContext(grid, True, seeds(2)[i].view(1)))[0]
                assert idx.shape[0] == m.n_keep(len(pos))
                keep[pos[idx]] = True
            seq = batch["input_ids"][i][batch["attention_mask"][i].bool()]
            start = int((seq == IMG).nonzero()[0])
            emb = adapter.model.get_input_embeddings()(seq).clone()
            emb[start:start + len(src)] = packed[i]
            rows = torch.cat([torch.ones(start, dtype=torch.bool), keep, torch.ones(len(seq) - start - len(src), dtype=torch.bool)])
            emb = emb[rows].unsqueeze(0)
            assert prepared.visual_tokens_kept[i] == int(keep.sum())
            # greedy decoding by hand: contiguous positions, KV cache
            out = adapter.model(inputs_embeds=emb, use_cache=True)
            toks = []
            for _ in range(5):
                nxt = out.logits[:, -1].argmax(-1)
                toks.append(int(nxt))
                if int(nxt) == EOS:
                    break
                out = adapter.model(input_ids=nxt.view(1, 1), past_key_values=out.past_key_values, use_cache=True)
            got = ours[i].tolist()[: len(toks)]
            assert got == toks
    finally:
        adapter.budget = "image"


@pytest.mark.parametrize("budget", ["image", "tile"])
def test_batch_of_8_equals_batch_of_1(adapter, budget):
    adapter.budget = budget
    try:
        batch = make_batch(adapter, SIZES)
        m = create("divprune", 0.6)
        prepared = adapter.prepare(batch, m, seeds(8))
        together = adapter.generate(prepared, max_new_tokens=4)
        for i in range(8):
            one = one_sample(batch, i)
            p1 = adapter.prepare(one, m, seeds(8)[i:i + 1])
            assert p1.visual_tokens_kept[0] == prepared.visual_tokens_kept[i]
            alone = adapter.generate(p1, max_new_tokens=4)
            assert together[i].tolist() == alone[0].tolist()
    finally:
        adapter.budget = "image"


@pytest.mark.parametrize("budget", ["image", "tile"])
def test_kept_tokens_keep_their_order_and_newlines(adapter, budget):
    """Kept features are the unpruned ones, in their unpruned (packed) order; every newline is kept, in place."""
    adapter.budget = budget
    try:
        batch = make_batch(adapter, SIZES[:1])
        full = adapter.encode_images(batch["pixel_values"], batch["image_sizes"])[0]
        prepared = adapter.prepare(batch, create("random", 0.5), seeds(1))
        s0, s1 = prepared.extras["image_spans"][0].tolist()
        kept = prepared.inputs_embeds[0, s0:s1]
        # each kept row is a packed row; their packed indices strictly increase
        match = (kept.unsqueeze(1) == full.unsqueeze(0)).all(-1)
        src = adapter.source_map(batch["image_sizes"][0], adapter._num_tiles(batch["image_sizes"][0]))
        vis_rows = (src >= 0)
        idx = [int(r.nonzero()[0]) if not (full[r.nonzero().flatten()] == adapter.model.model.image_newline).all() else -1 for r in match]
        vis_idx = [j for j in idx if j >= 0]
        assert vis_idx == sorted(vis_idx) and len(set(vis_idx)) == len(vis_idx)
        assert len(idx) - len(vis_idx) == int((~vis_rows).sum()) == prepared.extras["newline_tokens"][0]
        assert prepared.extras["budget"] == budget
    finally:
        adapter.budget = "image"


def test_refusals(adapter):
    for name in ("prumerge", "prumerge_plus"):  # official code for LLaVA-1.5 only: the precise reason
        with pytest.raises(IncompatibleMethodError, match="LLaVA-1.5 only"):
            adapter.check_method(create(name, 0.5))
    with pytest.raises(IncompatibleMethodError, match="use model.budget=tile"):  # FlowCut's official NeXT code budgets per tile
        adapter.check_method(create("flowcut", 0.5))
    with pytest.raises(IncompatibleMethodError, match="model.budget=image"):  # in-LLM: one budget per image
        adapter.budget = "tile"
        try:
            adapter.check_method(create("fastv", 0.5))
        finally:
            adapter.budget = "image"
    with pytest.raises(IncompatibleMethodError, match="budget=tile"):
        adapter.check_method(create("pool", 0.5))
    with pytest.raises(IncompatibleMethodError, match="model.budget=base_grid"):
        adapter.check_method(create("gprune", 0.5))
    adapter.check_method(create("divprune", 0.5))


def test_probe_batch_runs(adapter):
    batch = adapter.probe_batch(batch_size=2)
    prepared = adapter.prepare(batch, create("divprune", 0.5), seeds(2))
    assert prepared.visual_tokens_in[0] == 16 + 64 + 8  # base tile + 8 x 8 grid + 8 newlines
    assert adapter.prefill(prepared).logits.shape[:2] == (2, 1)


# ----------------------------------------------------------------------------- HoloV (official LLaVA-NeXT port)
def _holov():
    return create("holov", 0.6, chunks=4)  # 4 chunks: the tiny images have 48-80 non-newline tokens


def _eager_cls_attention(adapter, pixels, tiles, layer):
    """``(P, n)`` head-mean CLS-row attention of every tile at ``layer``, from an eager copy of the tower's
    ``output_attentions`` (independent of ``bench.models.clip_extras``)."""
    import copy

    vt = copy.deepcopy(adapter.model.model.vision_tower)
    vt.config._attn_implementation = "eager"
    with torch.no_grad():
        att = vt(pixels[:tiles], output_attentions=True).attentions[layer]  # (P, H, 1 + n, 1 + n)
    return att[:, :, 0, 1:].mean(dim=1).float()


def _decode_by_hand(adapter, emb, steps):
    out = adapter.model(inputs_embeds=emb, use_cache=True)
    toks = []
    for _ in range(steps):
        nxt = out.logits[:, -1].argmax(-1)
        toks.append(int(nxt))
        if int(nxt) == EOS:
            break
        out = adapter.model(input_ids=nxt.view(1, 1), past_key_values=out.past_key_values, use_cache=True)
    return toks


def test_holov_ratio_zero_is_the_unpruned_model_bit_for_bit(adapter):
    batch = make_batch(adapter, SIZES[:3])
    prepared = adapter.prepare(batch, create("holov", 0.0), seeds(3))
    assert prepared.extras["newline_tokens_kept"] == prepared.extras["newline_tokens"]
    ours = adapter.generate(prepared, max_new_tokens=6)
    ref = adapter.model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=PAD)[:, batch["input_ids"].shape[1]:]
    assert torch.equal(ours, ref)


@torch.no_grad()
def test_holov_pruned_generate_equals_the_official_layout_built_by_hand(adapter):
    """HoloV's official LLaVA-NeXT code: per-tile CLS attention stitched and unpadded like the features, newlines
    dropped, one HoloV call per image over [base tile; unpadded grid]; the rows it returns (zero rows included)
    are the image's tokens. Rebuilt here from the eager tower's attentions and ``holov_select``."""
    from methods.holov import holov_select

    batch = make_batch(adapter, SIZES[:3])
    m = _holov()
    prepared = adapter.prepare(batch, m, seeds(3))
    ours = adapter.generate(prepared, max_new_tokens=5)
    packed = adapter.encode_images(batch["pixel_values"], batch["image_sizes"])
    for i in range(3):
        size = batch["image_sizes"][i]
        tiles = adapter._num_tiles(size)
        src = adapter.source_map(size, tiles)
        vis = (src >= 0).nonzero().flatten()
        attn_tiles = _eager_cls_attention(adapter, batch["pixel_values"][i], tiles, m.layer)
        a = attn_tiles[src[vis] // adapter.tile_tokens, src[vis] % adapter.tile_tokens]
        x = packed[i][vis]
        idx = holov_select(x.unsqueeze(0), a.unsqueeze(0), m.n_keep(len(vis)), m.chunks, m.alpha)[0]
        rows = x[idx.clamp(min=0)] * (idx >= 0).unsqueeze(-1).to(x.dtype)
        assert prepared.visual_tokens_kept[i] == len(idx) == m.n_keep(len(vis))
        assert prepared.extras["newline_tokens_kept"][i] == 0 < prepared.extras["newline_tokens"][i]
        seq = batch["input_ids"][i][batch["attention_mask"][i].bool()]
        start = int((seq == IMG).nonzero()[0])
        text = adapter.model.get_input_embeddings()(seq)
        emb = torch.cat([text[:start], rows, text[start + len(src):]]).unsqueeze(0)
        s0, s1 = prepared.extras["image_spans"][i].tolist()
        assert torch.equal(prepared.inputs_embeds[i, s0:s1], rows)
        toks = _decode_by_hand(adapter, emb, 5)
        assert ours[i].tolist()[: len(toks)] == toks


def test_holov_batch_of_8_equals_batch_of_1(adapter):
    batch = make_batch(adapter, SIZES)
    m = _holov()
    prepared = adapter.prepare(batch, m, seeds(8))
    together = adapter.generate(prepared, max_new_tokens=4)
    for i in range(8):
        one = one_sample(batch, i)
        p1 = adapter.prepare(one, m, seeds(8)[i:i + 1])
        assert p1.visual_tokens_kept[0] == prepared.visual_tokens_kept[i]
        assert together[i].tolist() == adapter.generate(p1, max_new_tokens=4)[0].tolist()


def test_holov_only_with_its_official_budget(adapter):
    adapter.budget = "tile"
    try:
        with pytest.raises(IncompatibleMethodError, match="model.budget=image"):
            adapter.check_method(_holov())
    finally:
        adapter.budget = "image"
    adapter.check_method(_holov())


# ----------------------------------------------------------------------------- VisionZip (official LLaVA-NeXT port)
def _official_visionzip_image(adapter, pixels, size, m):
    """VisionZip's official LLaVA-NeXT tokens for one image, rebuilt by hand: eager tower attentions, the rule
    (``visionzip_merge``) per full tile, the projector on the kept rows, and ``restore_image_features_sorted``'s
    mask over the stitched (not unpadded) crop grid: [base rows; crops' dominant patches; crops' CLS; contextual]."""
    import copy

    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    from methods.visionzip import visionzip_merge

    tiles = adapter._num_tiles(size)
    vt = copy.deepcopy(adapter.model.model.vision_tower)
    vt.config._attn_implementation = "eager"
    out = vt(pixels[:tiles], output_attentions=True, output_hidden_states=True)
    enc = getattr(vt, "vision_model", vt).encoder
    li = m.layer % len(enc.layers)
    layer = enc.layers[li]
    k = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[li]))
    keys = k.view(tiles, k.shape[1], layer.self_attn.num_heads, -1).mean(dim=2)
    d, c = m.counts(adapter.tile_tokens)
    merged, index = visionzip_merge(out.attentions[li][:, :, 0, :], keys, out.hidden_states[li + 1], d, c, return_index=True)
    feats = adapter.model.model.multi_modal_projector(merged)
    side = adapter.grid[1]
    nph, npw = get_anyres_image_grid_shape(size.tolist(), adapter.config.image_grid_pinpoints, adapter.config.vision_config.image_size)
    crops, cidx = feats[1:], index[1:]
    mask = torch.zeros(tiles - 1, side * side, dtype=torch.bool)
    grid = torch.zeros(tiles - 1, side * side, feats.shape[-1])
    for t in range(tiles - 1):
        dom = cidx[t][cidx[t] > 0] - 1
        mask[t, dom] = True
        grid[t, dom] = crops[t][cidx[t] > 0]
    def stitch(x):
        x = x.view(nph, npw, side, side, *x.shape[3:]).transpose(1, 2)
        return x.reshape(nph * side, npw * side, *x.shape[4:])
    selected = stitch(grid.view(tiles - 1, side, side, -1))[stitch(mask.view(tiles - 1, side, side))]
    return torch.cat([feats[0], selected, crops[:, 0], crops[:, d:].reshape(-1, feats.shape[-1])])


@torch.no_grad()
def test_visionzip_pruned_generate_equals_the_official_layout_built_by_hand(adapter):
    adapter.budget = "tile"
    try:
        batch = make_batch(adapter, SIZES[:3])
        m = create("visionzip", 0.5)
        prepared = adapter.prepare(batch, m, seeds(3))
        ours = adapter.generate(prepared, max_new_tokens=5)
        for i in range(3):
            size = batch["image_sizes"][i]
            rows = _official_visionzip_image(adapter, batch["pixel_values"][i], size, m)
            assert prepared.visual_tokens_kept[i] == rows.shape[0] == adapter._num_tiles(size) * m.n_keep(adapter.tile_tokens)
            assert prepared.extras["newline_tokens_kept"][i] == 0
            s0, s1 = prepared.extras["image_spans"][i].tolist()
            torch.testing.assert_close(prepared.inputs_embeds[i, s0:s1], rows, rtol=1e-5, atol=1e-5)
            seq = batch["input_ids"][i][batch["attention_mask"][i].bool()]
            start = int((seq == IMG).nonzero()[0])
            n = len(adapter.source_map(size, adapter._num_tiles(size)))
            text = adapter.model.get_input_embeddings()(seq)
            emb = torch.cat([text[:start], prepared.inputs_embeds[i, s0:s1], text[start + n:]]).unsqueeze(0)
            toks = _decode_by_hand(adapter, emb, 5)
            assert ours[i].tolist()[: len(toks)] == toks
    finally:
        adapter.budget = "image"


def test_visionzip_ratio_zero_and_batch_of_8_equals_batch_of_1(adapter):
    adapter.budget = "tile"
    try:
        batch = make_batch(adapter, SIZES[:3])
        prepared = adapter.prepare(batch, create("visionzip", 0.0), seeds(3))
        ref = adapter.model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=PAD)[:, batch["input_ids"].shape[1]:]
        assert torch.equal(adapter.generate(prepared, max_new_tokens=6), ref)
        batch = make_batch(adapter, SIZES)
        m = create("visionzip", 0.6)
        prepared = adapter.prepare(batch, m, seeds(8))
        together = adapter.generate(prepared, max_new_tokens=4)
        for i in range(8):
            one = one_sample(batch, i)
            p1 = adapter.prepare(one, m, seeds(8)[i:i + 1])
            assert torch.equal(p1.inputs_embeds[0, p1.attention_mask[0].bool()],
                               prepared.inputs_embeds[i, prepared.attention_mask[i].bool()])
            assert together[i].tolist() == adapter.generate(p1, max_new_tokens=4)[0].tolist()
        with pytest.raises(IncompatibleMethodError, match="model.budget=tile"):
            adapter.budget = "image"
            adapter.check_method(m)
    finally:
        adapter.budget = "image"


# ----------------------------------------------------------------------------- G-Prune (official LLaVA-NeXT port)
@torch.no_grad()
def test_gprune_generate_equals_the_official_base_and_grid_graphs_with_original_positions(adapter):
    """G-Prune's official LLaVA-NeXT code: one graph on the base tile, one on the unpadded grid's non-newline
    tokens, ``int(keep_ratio * n)`` each, row-end newlines kept, kept tokens at their original position ids
    (decoding at last + 1). Rebuilt here with ``gprune_scores`` and decoded by hand with those positions."""
    import math

    from methods.gprune import gprune_scores

    adapter.budget = "base_grid"
    try:
        batch = make_batch(adapter, SIZES[:3])
        m = create("gprune", 0.6)
        prepared = adapter.prepare(batch, m, seeds(3))
        ours = adapter.generate(prepared, max_new_tokens=5)
        packed = adapter.encode_images(batch["pixel_values"], batch["image_sizes"])
        n_base = adapter.tile_tokens
        for i in range(3):
            size = batch["image_sizes"][i]
            src = adapter.source_map(size, adapter._num_tiles(size))
            x = packed[i]
            base = torch.arange(n_base)
            grid = n_base + (src[n_base:] >= 0).nonzero().flatten()
            rows_end = n_base + (src[n_base:] < 0).nonzero().flatten()
            keep = [rows_end]
            for unit in (base, grid):
                s = gprune_scores(x[unit].unsqueeze(0))[0]
                keep.append(unit[s.topk(math.floor(0.4 * len(unit))).indices])
            keep = torch.cat(keep).sort().values
            seq = batch["input_ids"][i][batch["attention_mask"][i].bool()]
            start = int((seq == IMG).nonzero()[0])
            after = len(seq) - start - len(src)
            text = adapter.model.get_input_embeddings()(seq)
            emb = torch.cat([text[:start], x[keep], text[start + len(src):]]).unsqueeze(0)
            pos = torch.cat([torch.arange(start), start + keep, start + len(src) + torch.arange(after)]).unsqueeze(0)
            s0, s1 = prepared.extras["image_spans"][i].tolist()
            assert torch.equal(prepared.inputs_embeds[i, s0:s1], x[keep])
            valid = prepared.attention_mask[i].bool()
            assert torch.equal(prepared.extras["position_ids"][i][valid].cpu(), pos[0])
            out = adapter.model(inputs_embeds=emb, position_ids=pos, use_cache=True)
            toks, last = [], int(pos[0, -1])
            for step in range(5):
                nxt = out.logits[:, -1].argmax(-1)
                toks.append(int(nxt))
                if int(nxt) == EOS:
                    break
                out = adapter.model(input_ids=nxt.view(1, 1), position_ids=torch.tensor([[last + 1 + step]]),
                                    past_key_values=out.past_key_values, use_cache=True)
            assert ours[i].tolist()[: len(toks)] == toks
        # batch 8 == batch 1, and ratio 0 is the unpruned model
        batch = make_batch(adapter, SIZES)
        prepared = adapter.prepare(batch, m, seeds(8))
        together = adapter.generate(prepared, max_new_tokens=4)
        for i in range(8):
            one = one_sample(batch, i)
            assert together[i].tolist() == adapter.generate(adapter.prepare(one, m, seeds(8)[i:i + 1]), max_new_tokens=4)[0].tolist()
        batch = make_batch(adapter, SIZES[:3])
        ref = adapter.model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=PAD)[:, batch["input_ids"].shape[1]:]
        assert torch.equal(adapter.generate(adapter.prepare(batch, create("gprune", 0.0), seeds(3)), max_new_tokens=6), ref)
    finally:
        adapter.budget = "image"


# ----------------------------------------------------------------------------- the per-tile ports (official LLaVA-NeXT code)
# CDPruner, VisPruner, FasterVLM and HiPrune run on LLaVA-NeXT as their official code does: selection on each full tile
# (model.budget=tile). CDPruner and VisPruner then stitch and unpad the crops' index masks like the features and keep
# every newline; FasterVLM and HiPrune lay the picks out in FasterVLM's hard-coded 'spatial' merge (stitched, not
# unpadded, no newline). The tests below run once per port against that port's official layout built by hand.
QUESTIONS = ["what colour is the square", "how many circles are there", "is there a red triangle",
             " ".join(["which shape is left of the blue circle"] * 12),  # > 77 tokens: two chunks, averaged
             "what is in the centre", "where is the star", "is the square above the circle", "what shape is green"]


@pytest.fixture(scope="module")
def cd_adapter():
    from bench.models.llava_next import LlavaNextAdapter

    a = LlavaNextAdapter(name="tiny_next", source="none", weights="random", device="cpu", dtype="float32", budget="tile",
                         text_tower={"source": "bench:configs/tiny-clip-text-random", "config_file": "bench:configs/tiny-clip-text-random.json"})
    a.model = tiny_llava_next()
    return a


def _with_texts(batch, n):
    return {**batch, "texts": QUESTIONS[:n]}


@torch.no_grad()
def _official_cdpruner_keep(adapter, pixels, size, question, t):
    """CDPruner's official LLaVA-NeXT selection for one image, rebuilt by hand: the tower on the image's tiles
    as one batch, the projector on every full tile, CLIP joint-space embeddings, the question's 77-token
    chunks through the text tower, ``official_selection`` (the official ``encode_images`` transcribed: one
    min-max over all tiles, the DPP batched over them), then the crops' index masks stitched, unpadded with
    transformers' ``unpad_image``, a ``True`` newline column appended, base mask first.
    Returns the packed positions kept and each tile's pick count before unpadding."""
    from test_cdpruner import official_selection

    side = adapter.clip_text()
    tiles = adapter._num_tiles(size)
    hid = adapter.model.model.vision_tower(pixels[:tiles], output_hidden_states=True).hidden_states[-2][:, 1:]
    feats = adapter.model.model.multi_modal_projector(hid)
    vm = adapter.model.model.vision_tower
    img = side.visual_projection(vm.post_layernorm(hid).float())
    tok = side.tokenizer(text=question, return_tensors="pt")
    seg = (tok.input_ids.shape[1] - 1) // 77 + 1
    tok = {k: torch.cat([v, v.new_zeros((1, 77 * seg - v.shape[1]))], dim=1).reshape(-1, 77) for k, v in tok.items()}
    txt = side.text_tower(**tok).text_embeds
    mask = official_selection(feats, img, txt, t)  # (P, n)
    return _official_unpadded_keep(adapter, mask, size), mask.sum(1)


def _official_unpadded_keep(adapter, mask, size):
    """``(P, n)`` per-tile index masks -> packed positions kept, as the official LLaVA-NeXT code of CDPruner and
    VisPruner builds them: crops' masks stitched, unpadded (transformers' ``unpad_image``), a ``True`` newline
    column appended, the base tile's mask first."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    side_n = adapter.grid[1]
    nph, npw = get_anyres_image_grid_shape(size.tolist(), adapter.config.image_grid_pinpoints, adapter.config.vision_config.image_size)
    grid = mask[1:].view(nph, npw, side_n, side_n).permute(0, 2, 1, 3).contiguous().unsqueeze(0).flatten(1, 2).flatten(2, 3)
    grid = unpad_image(grid, size)
    grid = torch.cat([grid, torch.ones(*grid.shape[:-1], 1, dtype=torch.bool)], dim=-1).flatten(1, 2).squeeze(0)
    return torch.cat([mask[0], grid]).nonzero().flatten()


def _official_spatial_rows(adapter, pixels, size, mask):
    """``(P, n)`` per-tile index masks -> the image's kept rows in FasterVLM's hard-coded ``'spatial'`` merge (HiPrune's
    official LLaVA-NeXT code reuses it): the projector on every tile, the base tile's picks, then
    ``image_feature.permute(0, 2, 1, 3, 4).flatten(0, 3)[index_mask]`` over the crops (no unpadding, no newline)."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    tiles = mask.shape[0]
    hid = adapter.model.model.vision_tower(pixels[:tiles], output_hidden_states=True).hidden_states[-2][:, 1:]
    feats = adapter.model.model.multi_modal_projector(hid)
    nph, npw = get_anyres_image_grid_shape(size.tolist(), adapter.config.image_grid_pinpoints, adapter.config.vision_config.image_size)
    h = w = adapter.grid[1]
    crops = feats[1:].view(nph, npw, h, w, -1).permute(0, 2, 1, 3, 4).contiguous().flatten(0, 3)
    cmask = mask[1:].view(nph, npw, h, w).permute(0, 2, 1, 3).contiguous().flatten(0, 3)
    return torch.cat([feats[0][mask[0]], crops[cmask]])


@torch.no_grad()
def _official_fastervlm_image(adapter, pixels, size, t, layer):
    """FasterVLM's official LLaVA-NeXT tokens for one image, rebuilt by hand: the eager tower's CLS attention at
    ``layer``, ``topk`` T per full tile, laid out by :func:`_official_spatial_rows`."""
    tiles = adapter._num_tiles(size)
    attn = _eager_cls_attention(adapter, pixels, tiles, layer)  # (P, n)
    mask = torch.zeros(tiles, adapter.tile_tokens, dtype=torch.bool)
    mask.scatter_(1, torch.topk(attn, k=t, dim=1)[1], True)
    return _official_spatial_rows(adapter, pixels, size, mask)


def _eager_colmean(adapter, pixels, tiles, layer):
    """``(P, n)`` attention averaged over heads, then over all query rows, CLS column dropped, from an eager copy
    of the tower (the official ``.mean(dim=1).mean(dim=1)[:, 1:]``)."""
    import copy

    vt = copy.deepcopy(adapter.model.model.vision_tower)
    vt.config._attn_implementation = "eager"
    with torch.no_grad():
        att = vt(pixels[:tiles], output_attentions=True).attentions[layer]
    return att.mean(dim=1).mean(dim=1)[:, 1:]


# each port's official layout of image i: (kept rows, picks per full tile before unpadding, packed positions kept or
# None where the rows are not packed rows in packed order)
def _official_cdpruner(adapter, batch, i, m, packed):
    keep, per_tile = _official_cdpruner_keep(adapter, batch["pixel_values"][i], batch["image_sizes"][i], batch["texts"][i], m.n_keep(adapter.tile_tokens))
    return packed[keep], per_tile, keep


def _official_vispruner(adapter, batch, i, m, packed):
    """VisPruner's official LLaVA-NeXT code: ``encode_images`` on the image's tiles as one batch (T per full tile:
    important by head-mean CLS attention at layer -2, diverse by de-duplicating layer -2 features), the crops'
    index masks stitched and unpadded like the features, newlines kept. Rebuilt from the eager tower's attentions
    and ``ref_vispruner_official``."""
    from reference_vision import ref_vispruner_official

    size, pixels, t = batch["image_sizes"][i], batch["pixel_values"][i], m.n_keep(adapter.tile_tokens)
    tiles = adapter._num_tiles(size)
    attn = _eager_cls_attention(adapter, pixels, tiles, m.layer)  # (P, n)
    hid = adapter.model.model.vision_tower(pixels[:tiles], output_hidden_states=True).hidden_states[m.layer][:, 1:]
    mask = torch.zeros(tiles, adapter.tile_tokens, dtype=torch.bool)
    for p in range(tiles):
        mask[p, ref_vispruner_official(attn[p], hid[p], t, m.important_ratio, m.step)] = True
    keep = _official_unpadded_keep(adapter, mask, size)
    return packed[keep], mask.sum(1), keep


def _official_fastervlm(adapter, batch, i, m, packed):
    size, t = batch["image_sizes"][i], m.n_keep(adapter.tile_tokens)
    rows = _official_fastervlm_image(adapter, batch["pixel_values"][i], size, t, m.layer)
    return rows, torch.full((adapter._num_tiles(size),), t), None  # topk: exactly T per tile


def _official_hiprune(adapter, batch, i, m, packed):
    """HiPrune's official LLaVA-NeXT code: ``int(N' / P)`` per full tile of the image's ``P`` tiles (``N'`` of the
    largest pinpoint's 5 tiles: 80 on the tiny model), each tile by ``ref_hiprune`` on the eager tower's attentions
    (object layer 9 of 24 is layer 1 of the tiny 2-layer tower, the deep layer -2 is layer 0), laid out like
    FasterVLM's hard-coded ``'spatial'`` merge (stitched, not unpadded, no newline)."""
    from reference_vision import ref_hiprune

    size, pixels = batch["image_sizes"][i], batch["pixel_values"][i]
    tiles = adapter._num_tiles(size)
    t = m.n_keep(5 * adapter.tile_tokens) // tiles  # N' = 40 of 80 at ratio 0.5
    shallow, deep = _eager_colmean(adapter, pixels, tiles, 1), _eager_colmean(adapter, pixels, tiles, 0)
    mask = torch.zeros(tiles, adapter.tile_tokens, dtype=torch.bool)
    for p in range(tiles):
        mask[p, ref_hiprune(shallow[p], deep[p], t, m.alpha, adapter.grid[1])] = True
    return _official_spatial_rows(adapter, pixels, size, mask), mask.sum(1), None


@dataclass(frozen=True)
class TilePort:
    official: Callable  # (adapter, batch, i, method, packed features of image i) -> (rows, picks per tile, kept positions | None)
    unpadded: bool  # True: the unpadded grid with every newline kept (CDPruner, VisPruner); False: the 'spatial' merge
    question: bool = False  # question-conditioned: runs on ``cd_adapter`` (a CLIP text tower) with ``texts``
    split_per_image: bool = False  # HiPrune: N' per image (of the largest pinpoint) split over its tiles, else T per tile


PORTS = {
    "cdpruner": TilePort(_official_cdpruner, unpadded=True, question=True),
    "vispruner": TilePort(_official_vispruner, unpadded=True),
    "fastervlm": TilePort(_official_fastervlm, unpadded=False),
    "hiprune": TilePort(_official_hiprune, unpadded=False, split_per_image=True),
}


@pytest.fixture(params=list(PORTS))
def port(request):
    """``(name, TilePort, adapter at model.budget=tile)``; the adapter's budget is restored afterwards."""
    spec = PORTS[request.param]
    a = request.getfixturevalue("cd_adapter" if spec.question else "adapter")
    before, a.budget = a.budget, "tile"
    yield request.param, spec, a
    a.budget = before


def _port_batch(spec, adapter, sizes):
    batch = make_batch(adapter, sizes)
    return _with_texts(batch, len(sizes)) if spec.question else batch


def _unpruned_generate(adapter, batch, steps):
    """The model's own greedy ``generate`` on the batch (no question text: the LLM never sees it)."""
    inputs = {k: v for k, v in batch.items() if k != "texts"}
    return adapter.model.generate(**inputs, max_new_tokens=steps, do_sample=False, pad_token_id=PAD)[:, batch["input_ids"].shape[1]:]


@torch.no_grad()
def test_tile_port_generate_equals_the_official_layout_built_by_hand(port):
    name, spec, adapter = port
    batch = _port_batch(spec, adapter, SIZES[:4])
    m = create(name, 0.5)
    prepared = adapter.prepare(batch, m, seeds(4))
    assert prepared.extras["budget"] == "tile"
    if spec.question:
        assert prepared.extras["clip_text"]["chunks"] == [1, 1, 1, 2]
    ours = adapter.generate(prepared, max_new_tokens=5)
    packed = adapter.encode_images(batch["pixel_values"], batch["image_sizes"])
    per_tile = set()
    for i in range(4):
        size = batch["image_sizes"][i]
        tiles = adapter._num_tiles(size)
        src = adapter.source_map(size, tiles)
        assert len(src) == len(packed[i])
        rows, picks, keep = spec.official(adapter, batch, i, m, packed[i])
        t = m.n_keep(5 * adapter.tile_tokens) // tiles if spec.split_per_image else m.n_keep(adapter.tile_tokens)
        per_tile.add(t)
        assert picks.tolist() == [t] * tiles  # T per full tile, before unpadding
        if spec.unpadded:
            assert (src[keep] < 0).sum() == (src < 0).sum()  # every newline kept
            assert prepared.extras["newline_tokens_kept"][i] == int((src < 0).sum())
        else:
            assert rows.shape[0] == tiles * t  # no unpadding
            assert prepared.extras["newline_tokens_kept"][i] == 0
        assert prepared.visual_tokens_kept[i] == rows.shape[0]
        s0, s1 = prepared.extras["image_spans"][i].tolist()
        assert torch.equal(prepared.inputs_embeds[i, s0:s1], rows)  # unpadded ports: the unpruned rows, in packed order
        seq = batch["input_ids"][i][batch["attention_mask"][i].bool()]
        start = int((seq == IMG).nonzero()[0])
        text = adapter.model.get_input_embeddings()(seq)
        emb = torch.cat([text[:start], rows, text[start + len(src):]]).unsqueeze(0)
        toks = _decode_by_hand(adapter, emb, 5)  # contiguous positions, as the official code renumbers them
        assert ours[i].tolist()[: len(toks)] == toks
    # 3-tile and 5-tile images: HiPrune's official split keeps more per tile on fewer tiles; the others T on each
    assert (len(per_tile) > 1) == spec.split_per_image


def test_tile_port_ratio_zero_is_the_unpruned_model(port):
    name, spec, adapter = port
    batch = _port_batch(spec, adapter, SIZES[:3])
    ours = adapter.generate(adapter.prepare(batch, create(name, 0.0), seeds(3)), max_new_tokens=6)
    assert torch.equal(ours, _unpruned_generate(adapter, batch, 6))


def test_tile_port_batch_of_8_equals_batch_of_1(port):
    name, spec, adapter = port
    batch = _port_batch(spec, adapter, SIZES)
    m = create(name, 0.75)
    prepared = adapter.prepare(batch, m, seeds(8))
    together = adapter.generate(prepared, max_new_tokens=4)
    for i in range(8):
        one = one_sample(batch, i)
        p1 = adapter.prepare(one, m, seeds(8)[i:i + 1])
        assert torch.equal(p1.inputs_embeds[0, p1.attention_mask[0].bool()], prepared.inputs_embeds[i, prepared.attention_mask[i].bool()])
        assert together[i].tolist() == adapter.generate(p1, max_new_tokens=4)[0].tolist()


def test_tile_port_only_with_its_official_budget(port):
    name, _, adapter = port
    for ratio in (0.5, 0.75):
        for budget in ("image", "base_grid"):
            adapter.budget = budget
            with pytest.raises(IncompatibleMethodError, match="model.budget=tile"):
                adapter.check_method(create(name, ratio))
        adapter.budget = "tile"
        adapter.check_method(create(name, ratio))


def test_cdpruner_question_changes_the_selection_and_is_required(cd_adapter):
    adapter = cd_adapter
    batch = make_batch(adapter, SIZES[2:3])
    m = create("cdpruner", 0.75)
    kept = {q: adapter.prepare({**batch, "texts": [q]}, m, seeds(1)).inputs_embeds for q in QUESTIONS[:4]}
    assert len({tuple(v.flatten().tolist()) for v in kept.values()}) > 1
    with pytest.raises(IncompatibleMethodError, match="question text"):
        adapter.prepare(batch, m, seeds(1))


def test_cdpruner_needs_a_text_tower(adapter):
    try:
        for budget in ("image", "tile"):  # the fixture without model.text_tower
            adapter.budget = budget
            with pytest.raises(IncompatibleMethodError, match="text tower"):
                adapter.check_method(create("cdpruner", 0.5))
    finally:
        adapter.budget = "image"


def test_hiprune_split_beyond_a_tile_is_refused(adapter):
    adapter.budget = "tile"
    try:
        with pytest.raises(IncompatibleMethodError, match="exceeds a tile"):  # N' = 64 of 80 over 3 tiles: 21 > 16
            adapter.check_method(create("hiprune", 0.2))
    finally:
        adapter.budget = "image"


# ----------------------------------------------------------------------------- the per-tile ports on CUDA
TILE_PORTS = [("cdpruner", 1 - 64 / 576), ("vispruner", 1 - 64 / 576), ("fastervlm", 1 - 64 / 576), ("hiprune", 1 - 320 / 2880)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name,ratio", TILE_PORTS)
def test_tile_ports_cuda_batch_of_8_equals_batch_of_1(name, ratio):
    """fp16 on CUDA, the tiny model: each image's tiles go through the tower, the projector and the selection on
    their own, so a sample's kept rows are bit-identical whatever its batch neighbours."""
    from bench.models.llava_next import LlavaNextAdapter

    a = LlavaNextAdapter(name="tiny_next", source="none", weights="random", device="cuda", dtype="float16", budget="tile",
                         text_tower={"source": "bench:configs/tiny-clip-text-random", "config_file": "bench:configs/tiny-clip-text-random.json"})
    a.model = tiny_llava_next().to("cuda", torch.float16)
    batch = _with_texts(make_batch(a, SIZES), 8)
    m = create(name, 0.5)
    prepared = a.prepare(batch, m, seeds(8))
    for i in range(8):
        one = one_sample(batch, i)
        p1 = a.prepare(one, m, seeds(8)[i:i + 1])
        assert torch.equal(p1.inputs_embeds[0, p1.attention_mask[0].bool()], prepared.inputs_embeds[i, prepared.attention_mask[i].bool()])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tile_ports_at_real_shapes_cuda():
    """LLaVA-NeXT-7B's architecture (random weights, fp16) at 672 x 672 (5 tiles, 2,880 tokens + 48 newlines): each
    per-tile port keeps its official count: 64 per tile (ratio 1 - 64/576; CDPruner and VisPruner after unpadding,
    which cuts nothing at a square image, plus the 48 newlines; FasterVLM without newlines), HiPrune N' = 320 of
    2,880 split over the 5 tiles."""
    import yaml
    from hydra.utils import get_class

    from bench.families import CONF

    cfg = yaml.safe_load((CONF / "llava_next_7b.yaml").read_text())
    cfg.update(device="cuda", weights="random", budget="tile")
    a = get_class(cfg.pop("_target_"))(**cfg).load()
    batch = a.probe_batch(batch_size=1)
    want = {"cdpruner": 5 * 64 + 48, "vispruner": 5 * 64 + 48, "fastervlm": 5 * 64, "hiprune": 320}
    for name, ratio in TILE_PORTS:
        m = create(name, ratio)
        a.check_method(m)
        prepared = a.prepare(batch, m, seeds(1))
        assert prepared.visual_tokens_in == [2880 + 48]
        if name == "cdpruner":  # a degenerate kernel may repeat picks: never more than the official count
            assert prepared.visual_tokens_kept[0] <= want[name]
        else:
            assert prepared.visual_tokens_kept == [want[name]], name
        out = a.prefill(prepared, m)
        assert torch.isfinite(out.logits).all(), name
