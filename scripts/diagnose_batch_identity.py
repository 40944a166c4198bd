"""Where does batch size change a pre-LLM selection? Vision tower + projector vs the selection itself.

Issue 8 measures fp16 prediction identity between batch 1 and batch 8/16 on the GPU. A discrete
selection such as DivPrune's greedy max-min on fp16 cosine distances (many exact ties at fp16
resolution) flips when its input changes in the last bit, so this script separates the two places
where the batch size can change bits, on the embedded tiny model's SynthVQA test images:

* ``features``: projected visual tokens of each image encoded alone (B=1) vs inside batches of ``B``
  (share of images whose ``(N, D)`` features are bitwise equal, max abs difference);
* ``selection``: the method's kept indices computed (a) per image on B=1 features, (b) batched on the
  same B=1 features (batch variance of the selection alone), (c) batched on batched features (what
  batched evaluation does), and (d) per image on batched features.

The tower runs batched here (``--per-image-vision 0``, the default), as it did before the adapter's
``per_image_vision`` fix, which this script motivated; ``--per-image-vision 1`` checks the fix itself.
Writes one CSV row per (method, batch) to ``--out``; prints a summary. CPU works too (``--n 16``).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def share_equal(xs, ys) -> float:
    """Share of pairs of tensors that are bitwise equal."""
    return sum(torch.equal(x, y) for x, y in zip(xs, ys, strict=True)) / len(xs)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=96, help="test images")
    ap.add_argument("--batches", type=int, nargs="*", default=[8, 16])
    ap.add_argument("--methods", nargs="*", default=["divprune", "fastervlm", "visionzip", "random"])
    ap.add_argument("--ratio", type=float, default=0.8889)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--graphs", type=int, default=1, help="selection CUDA graphs as in evaluation (CUDA only)")
    ap.add_argument("--per-image-vision", type=int, default=0, help="the adapter's per_image_vision (0: batched tower)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    from bench.models.llava import LlavaAdapter
    from bench.build import build_method, compose_config
    from bench.synthvqa.data import load_test

    ad = LlavaAdapter("tiny_llava_synth", "bench:tiny-llava-synth", device=args.device, dtype=args.dtype).load()
    ad.selection_graphs = bool(args.graphs)
    ad.per_image_vision = bool(args.per_image_vision)
    docs = load_test(n=args.n * 4)
    seen, images = set(), []
    for d in docs:  # several questions share an image; one entry per image
        key = d["image"].tobytes()
        if key not in seen:
            seen.add(key)
            images.append(d["image"])
        if len(images) == args.n:
            break
    pix = ad.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    seeds = torch.arange(len(images))

    def feats_at(bs):
        return torch.cat([ad.encode_images(pix[i : i + bs]) for i in range(0, len(images), bs)])

    def kept(method, feats, bs, hidden_bs=None):
        out = []
        for i in range(0, feats.shape[0], bs):
            f = feats[i : i + bs]
            if method.needs:  # extras come from the tower's hidden states: recompute them at the same batch
                _, hidden = ad.encode_images(pix[i : i + bs], output_hidden_states=True)
            else:
                hidden = None
            if ad.replays_selection(method):
                sel = ad.graphed_selection(method)(f, hidden)
            else:
                sel = method.reduce(f, ad.vision_context(seeds[i : i + bs], hidden, method.needs))
            got = sel.kept_index if sel.kept_index is not None else sel.features  # merging methods: compare what the LLM sees
            out += [got[j, : int(sel.n_kept[j])].cpu() for j in range(f.shape[0])]
        return out

    with torch.no_grad():
        f1 = feats_at(1)
        rows = []
        for bs in args.batches:
            fb = feats_at(bs)
            maxdiff = (f1.float() - fb.float()).abs().max().item()
            for name in args.methods:
                m = build_method(compose_config([f"method={name}", f"ratio={args.ratio}"]))
                ref = kept(m, f1, 1)
                row = {
                    "method": name, "batch": bs, "n_images": len(images), "device": str(ad.device), "dtype": str(ad.dtype),
                    "features_bitwise_equal": share_equal(f1, fb), "features_max_abs_diff": maxdiff,
                    "sel_b1feats_batched": share_equal(ref, kept(m, f1, bs)),
                    "sel_batchfeats_batched": share_equal(ref, kept(m, fb, bs)),
                    "sel_batchfeats_per_image": share_equal(ref, kept(m, fb, 1)),
                }
                rows.append(row)
                print("[ident]", " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
