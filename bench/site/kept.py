"""Kept-token pictures: which patches of a few fixed SynthVQA images each method keeps, at 0.5 / 0.75 / 0.9.

Drawn from the harness's own code path on the embedded tiny model (``bench:tiny-llava-synth``): the
processor batch, ``LlavaAdapter.visual_selection`` (the pre-LLM and in-vision selection that
``prepare`` runs) and, for in-LLM methods, one ``prefill`` inside the adapter's pruning hooks, whose
``prepared.extras["llm_stages"]`` holds the kept indices into the 576 visual tokens at every stage.
Per-sample seeds are the harness's (``bench.lmms_model.sample_seed`` of run seed 0 and the document).

Merging methods hand the LLM averaged tokens, not a subset (``VisualSelection.kept_index is None``):
for ``pool`` the picture shows the pooling windows, found by running the method's own ``reduce`` on
the identity matrix (pooling is linear, so row ``k`` of the result is output token ``k``'s window);
for the other mergers (their merges depend on attention inside the tower) the page says that no
patch subset exists instead of drawing one.

Pictures depend on code and weights, not on records, so they are cached under
``<cache>/kept-pictures/<key>/`` where ``key`` hashes every input (method and model code, configs,
weights, this file); a build reuses them byte for byte. The site directory ships them too, with
``kept/manifest.json`` (the key, each picture's SHA-256 and the CPU that drew it): a build whose key
matches reuses the shipped pictures rather than drawing them again. The CPU is not part of the key on
purpose: the tiny model's near ties (CDPruner's DPP once its kernel's rank is spent, VisPruner's tied
scores) round differently on another CPU's kernels, so a kept count can come out one off there, and
redrawing would make a committed site differ per machine. Every picture names the CPU that drew it.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.records import atomic_write_bytes, atomic_write_text

ROOT = Path(__file__).resolve().parent.parent.parent
#: SynthVQA test documents drawn (one per question type among the first five: colour, shape, count)
IMAGES = (0, 1, 2)
RATIOS = (0.5, 0.75, 0.9)
MODEL_CONF = "tiny_llava_synth"
#: output panel size in pixels (the 336 px image at half size: 7 px per patch)
PANEL = 168
VERSION = 2
#: the site directory's record of its pictures: ``{"version", "key", "pictures": {method: [Picture...]}}``
MANIFEST = "manifest.json"


@dataclass
class Panel:
    label: str
    n_kept: int | None


@dataclass
class Picture:
    method: str
    ratio: float
    doc_id: int
    question: str
    file: str | None  # relative to the pictures' directory; None when nothing can be drawn
    panels: list[Panel] = field(default_factory=list)
    note: str = ""
    cpu: str = ""  # the CPU that drew it (``bench.environment.cpu``): near ties may round otherwise on another
    sha256: str = ""  # of the PNG, checked before a shipped picture is reused


def _inputs() -> list[Path]:
    files = [Path(__file__), ROOT / "conf" / "model" / f"{MODEL_CONF}.yaml", ROOT / "bench" / "synthvqa" / "generator.py",
             ROOT / "bench" / "tiny_llava.py", ROOT / "bench" / "lmms_model.py"]
    for d in ("methods", "kernels", "bench/models", "conf/method", "bench/assets/tiny-llava-synth"):
        if (ROOT / d).is_dir():
            # documentation (the model card) decides nothing drawn
            files += sorted(p for p in (ROOT / d).rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".md")
    return files


def cache_key() -> str:
    h = hashlib.sha256(f"v{VERSION}".encode())
    for p in _inputs():
        if p.exists():
            h.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _cache_dir() -> Path:
    from bench.synthvqa.data import cache_root

    return cache_root() / "kept-pictures" / cache_key()


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _panel(img: np.ndarray, keep: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """``img`` (PANEL, PANEL, 3) with patches outside ``keep`` ((N,) bool) dimmed and hatched grey."""
    gh, gw = grid
    m = keep.reshape(gh, gw).repeat(PANEL // gh, 0).repeat(PANEL // gw, 1)
    out = img.astype(np.float32)
    dim = out * 0.22 + 70
    out = np.where(m[..., None], out, dim)
    # faint patch grid so single kept patches stay visible
    out[:: PANEL // gh, :, :] *= 0.85
    out[:, :: PANEL // gw, :] *= 0.85
    return out.clip(0, 255).astype(np.uint8)


def _windows_panel(img: np.ndarray, owner: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Borders between patches owned by different output tokens (``owner``: (N,) token index)."""
    gh, gw = grid
    o = owner.reshape(gh, gw).repeat(PANEL // gh, 0).repeat(PANEL // gw, 1)
    edge = np.zeros(o.shape, dtype=bool)
    edge[1:, :] |= o[1:, :] != o[:-1, :]
    edge[:, 1:] |= o[:, 1:] != o[:, :-1]
    out = img.copy()
    out[edge] = (255, 255, 255)
    return out


def _strip(panels: list[np.ndarray]) -> np.ndarray:
    gap = np.full((PANEL, 6, 3), 255, dtype=np.uint8)
    parts = []
    for i, p in enumerate(panels):
        parts += [gap, p] if i else [p]
    return np.concatenate(parts, axis=1)


def _compute(methods: list[str], cache: Path) -> dict[str, list[Picture]]:
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from PIL import Image

    from bench.environment import cpu
    from bench.lmms_model import sample_seed
    from bench.models.llava import LlavaAdapter
    from bench.synthvqa.generator import TEST_SEED, make_example
    from bench.tiny_llava import prompt_text

    mconf = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / f"{MODEL_CONF}.yaml"))
    ad = LlavaAdapter(**{**{k: v for k, v in mconf.items() if k != "_target_"}, "device": "cpu", "dtype": "float32"}).load()
    rows = [make_example("test", TEST_SEED, i) for i in IMAGES]
    batch = ad.processor(images=[r["image"] for r in rows], text=[prompt_text(r["question"]) for r in rows], return_tensors="pt", padding=True)
    seeds = torch.tensor([sample_seed(0, "synthvqa", i) for i in IMAGES], dtype=torch.long)
    base = [np.asarray(r["image"].convert("RGB").resize((PANEL, PANEL), Image.BILINEAR)) for r in rows]
    grid = ad.grid
    n = grid[0] * grid[1]
    result: dict[str, list[Picture]] = {}
    for name in methods:
        out = cache / name
        pics: list[Picture] = result.setdefault(name, [])
        for ratio in RATIOS:
            cfg = OmegaConf.load(ROOT / "conf" / "method" / f"{name}.yaml")
            cfg.prune_ratio, cfg.seed = ratio, 0
            cfg = {k: v for k, v in OmegaConf.to_container(cfg).items() if k not in ("name", "description")}
            method = instantiate(cfg, _convert_="all")
            with torch.no_grad():
                sel = ad.visual_selection(batch["pixel_values"], method, seeds, [r["question"] for r in rows])
                stages = None
                if method.stage == "in_llm":
                    prepared = ad.prepare(batch, method, seeds)
                    ad.prefill(prepared, method=method)
                    stages = prepared.extras.get("llm_stages") or []
                owner = None
                if name == "pool" and sel.kept_index is None:
                    eye = torch.eye(n).unsqueeze(0)  # (1, N, N): token j has feature e_j
                    owner = method.reduce(eye, ad.vision_context(seeds[:1])).features[0].argmax(dim=0).numpy()  # (N,)
            for b, doc in enumerate(IMAGES):
                pic = Picture(name, ratio, doc, rows[b]["question"], None, cpu=cpu())
                if stages is not None:
                    arrs = [base[b]]
                    pic.panels.append(Panel("LLM input: all visual tokens", n))
                    for st in stages:
                        idx = st["kept_index"][b].numpy()
                        keep = np.zeros(n, dtype=bool)
                        keep[idx[(idx >= 0) & (idx < n)]] = True
                        merged = int((idx < 0).sum())
                        arrs.append(_panel(base[b], keep, grid))
                        lab = f"from LLM layer {st['layer']}: {int(keep.sum())} kept" + (f" + {merged} merged" if merged else "")
                        pic.panels.append(Panel(lab, int(st["n_keep"])))
                    pic.note = f"in-LLM: indices from prepared.extras['llm_stages'] after one prefill of the {ad.num_llm_layers}-layer tiny LLM (layer indices scaled from the 32-layer defaults)"
                elif sel.kept_index is not None:
                    idx = sel.kept_index[b, : int(sel.n_kept[b])].numpy()
                    keep = np.zeros(n, dtype=bool)
                    keep[idx] = True
                    arrs = [base[b], _panel(base[b], keep, grid)]
                    pic.panels += [Panel("image", None), Panel(f"kept before the LLM: {int(keep.sum())} of {n}", int(keep.sum()))]
                elif owner is not None:
                    arrs = [base[b], _windows_panel(base[b], owner, grid)]
                    pic.panels += [Panel("image", None), Panel(f"{int(sel.n_kept[b])} pooled tokens (their windows)", int(sel.n_kept[b]))]
                    pic.note = "pooling merges every window into one token: no patch is dropped"
                else:
                    pic.note = (f"{name} merges tokens ({method.stage}): the LLM gets {int(sel.n_kept[b])} averaged tokens and the "
                                "selection reports no kept-patch indices, so no patch subset is drawn")
                    pics.append(pic)
                    continue
                pic.file = f"{name}__r{ratio}__doc{doc}.png"
                png = _png(_strip(arrs))
                pic.sha256 = hashlib.sha256(png).hexdigest()
                atomic_write_bytes(out / pic.file, png)
                pics.append(pic)
    return result


def _from_json(d: dict[str, Any]) -> Picture:
    return Picture(**{**d, "panels": [Panel(**p) for p in d["panels"]]})


def _shipped(dest: Path, key: str) -> dict[str, list[Picture]]:
    """The pictures ``dest`` already holds from a build with this ``key``: a method's whole set, or none of it where a
    file is missing or its bytes differ from the manifest (a corrupt or unreadable manifest ships nothing)."""
    try:
        man = json.loads((dest / MANIFEST).read_text())
        if man.get("version") != VERSION or man.get("key") != key:
            return {}
        shipped = {name: [_from_json(d) for d in pics] for name, pics in man["pictures"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}

    def intact(p: Picture) -> bool:
        try:
            return not p.file or hashlib.sha256((dest / p.file).read_bytes()).hexdigest() == p.sha256
        except OSError:
            return False

    return {name: pics for name, pics in shipped.items() if all(intact(p) for p in pics)}


def kept_pictures(methods: list[str], dest: Path) -> dict[str, list[Picture]]:
    """Write every method's pictures under ``dest`` (``<method>__r<ratio>__doc<id>.png``) and ``dest/manifest.json``;
    ``method -> pictures``.

    ``none`` has no pictures (it keeps everything). Reused from ``dest`` (a shipped site) or the cache where their
    key matches; drawn otherwise.
    """
    key = cache_key()
    shipped = _shipped(dest, key)
    cache = _cache_dir()
    out: dict[str, list[Picture]] = {}
    todo = [m for m in methods if m != "none" and m not in shipped and not (cache / m / "manifest.json").exists()]
    if todo:
        for name, pics in _compute(todo, cache).items():
            atomic_write_text(cache / name / "manifest.json", json.dumps([asdict(p) for p in pics], indent=1))
    for name in methods:
        if name == "none":
            continue
        if name in shipped:
            out[name] = shipped[name]
            continue
        mdir = cache / name
        pics = [_from_json(d) for d in json.loads((mdir / "manifest.json").read_text())]
        for p in pics:
            if p.file:
                atomic_write_bytes(dest / p.file, (mdir / p.file).read_bytes())
        out[name] = pics
    manifest = {"version": VERSION, "key": key, "pictures": {name: [asdict(p) for p in pics] for name, pics in sorted(out.items())}}
    atomic_write_text(dest / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return out
