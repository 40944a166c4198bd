#!/usr/bin/env python
"""Why the embedded tiny LLaVA answers position questions at chance (issue 3; numbers in its MODEL_CARD).

Two CPU measurements on the SynthVQA test split:

1. Linear probes: do the visual tokens carry position?  Least squares from the layer -2 features and from the
   projected tokens to each patch's (x, y) centre in [-1, 1], fit on the first half of ``--images`` images and
   scored (R^2) on the second half, over all patches and over patches that overlap an object.
2. LM attention from the answer position (eager attention): per layer, the best head's attention mass on the
   asked object and on all objects together, for colour and position questions.

    python scripts/diagnose_tiny_position.py [--model bench/assets/tiny-llava-synth] [--images 200]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.models.llava import chat_prompt  # noqa: E402
from bench.synthvqa.generator import POST_PROMPT, make_example  # noqa: E402
from bench.tiny_llava import GRID, TINY_LLAVA_PATH, object_patch_mask, patch_centres, pixel_tensor  # noqa: E402


def r2_probe(x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray) -> np.ndarray:
    a = np.c_[x[train], np.ones(train.sum())]
    w = np.linalg.lstsq(a, y[train], rcond=None)[0]
    pred = np.c_[x[test], np.ones(test.sum())] @ w
    return 1 - ((pred - y[test]) ** 2).sum(0) / ((y[test] - y[test].mean(0)) ** 2).sum(0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=TINY_LLAVA_PATH)
    ap.add_argument("--images", type=int, default=200, help="test images of the probes (half fit, half score)")
    ap.add_argument("--questions", type=int, default=150, help="test questions scanned for the attention part")
    args = ap.parse_args(argv)
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(args.model, attn_implementation="eager").eval()
    proc = AutoProcessor.from_pretrained(args.model)

    n = args.images
    exs = [make_example("test", 0, i) for i in range(n)]
    with torch.no_grad():
        feat = model.model.vision_tower(pixel_tensor([e["image"] for e in exs]), output_hidden_states=True).hidden_states[-2][:, 1:]
        proj = model.model.multi_modal_projector(feat)
    xy = np.tile(patch_centres(GRID), (n, 1))
    obj = np.concatenate([object_patch_mask(e["objects"]).reshape(-1) for e in exs]).astype(bool)
    first = np.arange(len(xy)) < (n // 2) * GRID * GRID
    print("1. linear probe R^2 of the patch centre (x, y), second half of the images")
    for name, t in (("layer -2 features", feat), ("projected tokens", proj)):
        x = t.reshape(-1, t.shape[-1]).numpy()
        for sel, lab in ((np.ones_like(obj), "all patches"), (obj, "object patches")):
            r2 = r2_probe(x, xy, first & sel, ~first & sel)
            print(f"   {name:<18} {lab:<15} x {r2[0]:.3f}  y {r2[1]:.3f}")

    print("2. answer position -> image tokens, best head per layer (mean over questions)")
    image_id = model.config.image_token_id
    stats: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for i in range(args.questions):
        e = make_example("test", 0, i)
        if e["qtype"] == "color":
            shape = e["question"].split()[-1].rstrip("?")
            target = [o for o in e["objects"] if o["shape"] == shape][0]
        elif e["qtype"] == "position":
            target = e["objects"][0]  # the first-named object ("is the A left of the B?")
        else:
            continue
        inputs = proc(images=[e["image"]], text=[chat_prompt(proc, e["question"] + POST_PROMPT)], return_tensors="pt")
        with torch.no_grad():
            out = model(**inputs, output_attentions=True)
        img = (inputs["input_ids"][0] == image_id).nonzero()[:, 0]
        m_t = torch.from_numpy(object_patch_mask([target]).reshape(-1)).bool()
        m_all = torch.from_numpy(object_patch_mask(e["objects"]).reshape(-1)).bool()
        for layer, a in enumerate(out.attentions):
            a = a[0, :, -1, img]  # (heads, 576)
            stats.setdefault((e["qtype"], layer), []).append((a[:, m_t].sum(-1).max().item(), a[:, m_all].sum(-1).max().item()))
    for (qtype, layer), v in sorted(stats.items()):
        v = np.array(v)
        print(f"   {qtype:<8} layer {layer}: asked object {v[:, 0].mean():.3f}  all objects {v[:, 1].mean():.3f}  ({len(v)} questions)")


if __name__ == "__main__":
    main()
