"""SynthVQA scene and question generator.

Scenes are 336x336 RGB images of small coloured shapes on plain or textured backgrounds; each example
asks one question whose one-word answer needs fine detail (small objects, counting) or global context
(relative position).  Everything is a pure function of ``(split, seed, index)``: each example draws from
its own ``numpy.random.Generator`` seeded by ``SeedSequence([split_code, seed, index])``, so the test
split (split code 0) and the training stream (split code 1) never share a random stream, and no global
RNG is touched.

This module imports only numpy and PIL (the GPU training machine has no lmms-eval / datasets).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

GENERATOR_VERSION = 1
"""Bump whenever the generated images, questions or answers change (it keys the data cache)."""

IMAGE_SIZE = 336

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 160, 55),
    "blue": (35, 75, 220),
    "yellow": (235, 205, 25),
    "purple": (135, 50, 175),
    "orange": (245, 125, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "cross": "crosses",
}
SIZES: dict[str, int] = {"small": 22, "medium": 32, "large": 46}
BACKGROUNDS: tuple[str, ...] = ("plain", "noise", "stripes", "gradient")
QTYPES: tuple[str, ...] = ("color", "shape", "count", "position", "exist")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
MAX_COUNT = 4
MIN_SEP = 36  # pixels between object centres along the axis a position question asks about
TEST_SIZE = 1000  # the fixed test split: 200 questions of each type
TEST_SEED = 0

_SPLIT_CODES = {"test": 0, "train": 1}

# Every word a question or answer can contain (lowercase), and the fixed post-prompt of the lmms-eval task.
QUESTION_WORDS = [
    "what", "color", "is", "the", "shape", "object", "how", "many", "are", "there",
    "left", "right", "of", "above", "below", "?",
]
ANSWER_WORDS = ["yes", "no"] + [str(i) for i in range(10)]
POST_PROMPT = "\nAnswer the question using a single word."
POST_PROMPT_WORDS = ["answer", "the", "question", "using", "a", "single", "word", "."]
VOCAB: list[str] = sorted(
    set(QUESTION_WORDS)
    | set(ANSWER_WORDS)
    | set(COLORS)
    | set(SHAPES)
    | set(PLURALS.values())
    | set(POST_PROMPT_WORDS)
)
"""All lowercase words (punctuation split off) in SynthVQA questions, answers and the task post-prompt."""


def _rng(split: str, seed: int, index: int) -> np.random.Generator:
    if split not in _SPLIT_CODES:
        raise ValueError(f"split must be one of {sorted(_SPLIT_CODES)}, got {split!r}")
    return np.random.default_rng(np.random.SeedSequence([_SPLIT_CODES[split], int(seed), int(index)]))


# ----------------------------------------------------------------------------------------------- drawing
def _background(rng: np.random.Generator) -> tuple[str, np.ndarray]:
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    s = IMAGE_SIZE

    def grey() -> np.ndarray:  # desaturated tone, never confusable with an object colour
        g = rng.uniform(70, 215)
        return np.clip(g + rng.uniform(-12, 12, size=3), 0, 255)

    if kind == "plain":
        return kind, np.broadcast_to(grey().astype(np.uint8), (s, s, 3))
    if kind == "noise":
        img = grey().astype(np.float32)[None, None, :] + np.float32(rng.uniform(8, 22)) * rng.standard_normal(
            size=(s, s, 1), dtype=np.float32
        )
    elif kind == "stripes":
        a, b = grey().astype(np.float32), grey().astype(np.float32)
        period = int(rng.integers(10, 40))
        yy, xx = np.arange(s)[:, None], np.arange(s)[None, :]
        coord = [xx + 0 * yy, yy + 0 * xx, xx + yy, xx - yy + s][int(rng.integers(4))]
        mask = ((coord // period) % 2).astype(bool)
        img = np.where(mask[..., None], b, a)
    else:  # gradient
        a, b = grey().astype(np.float32), grey().astype(np.float32)
        t = np.linspace(0, 1, s, dtype=np.float32)
        t = t[None, :, None] if rng.random() < 0.5 else t[:, None, None]
        img = np.broadcast_to(a * (1 - t) + b * t, (s, s, 3))
    return kind, np.clip(img, 0, 255).astype(np.uint8)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, bbox: list[int], fill: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = bbox
    w = x1 - x0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
    elif shape == "square":
        m = w * 0.08
        draw.rectangle([x0 + m, y0 + m, x1 - 1 - m, y1 - 1 - m], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    elif shape == "star":
        r_out, r_in = w / 2, w / 2 * 0.42
        pts = []
        for k in range(10):
            r = r_out if k % 2 == 0 else r_in
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + r * math.cos(a), cy + 0.06 * w + r * math.sin(a)))
        draw.polygon(pts, fill=fill)
    elif shape == "cross":
        t = w / 6
        draw.rectangle([cx - t, y0, cx + t, y1 - 1], fill=fill)
        draw.rectangle([x0, cy - t, x1 - 1, cy + t], fill=fill)
    else:
        raise ValueError(shape)


def _place(rng: np.random.Generator, specs: list[tuple[str, str, str]]) -> list[dict[str, Any]] | None:
    """Place objects (shape, colour, size) without overlap; None when the scene does not fit."""
    objs: list[dict[str, Any]] = []
    boxes: list[tuple[int, int, int, int]] = []
    for shape, color, size in specs:
        side = SIZES[size] + int(rng.integers(-2, 3))
        for _ in range(60):
            x0 = int(rng.integers(4, IMAGE_SIZE - 4 - side))
            y0 = int(rng.integers(4, IMAGE_SIZE - 4 - side))
            b = (x0, y0, x0 + side, y0 + side)
            if all(b[0] >= o[2] + 6 or o[0] >= b[2] + 6 or b[1] >= o[3] + 6 or o[1] >= b[3] + 6 for o in boxes):
                break
        else:
            return None
        boxes.append(b)
        objs.append({"shape": shape, "color": color, "size": size, "bbox": list(b)})
    return objs


def render(objects: list[dict[str, Any]], rng: np.random.Generator) -> tuple[Image.Image, str]:
    kind, bg = _background(rng)
    img = Image.fromarray(np.ascontiguousarray(bg), "RGB")
    draw = ImageDraw.Draw(img)
    for o in objects:
        base = np.array(COLORS[o["color"]], dtype=np.float64)
        fill = tuple(int(v) for v in np.clip(base + rng.integers(-14, 15, size=3), 0, 255))
        _draw_shape(draw, o["shape"], o["bbox"], fill)
    return img, kind


# ---------------------------------------------------------------------------------------------- scenes
def _choice(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _rand_size(rng: np.random.Generator) -> str:
    # small objects are the most common: they are what coarse pruning loses first
    return ["small", "small", "medium", "medium", "large"][int(rng.integers(5))]


def _fillers(rng: np.random.Generator, n: int, ok) -> list[tuple[str, str, str]]:
    out = []
    while len(out) < n:
        spec = (_choice(rng, SHAPES), _choice(rng, list(COLORS)), _rand_size(rng))
        if ok(spec, out):
            out.append(spec)
    return out


def _question(rng: np.random.Generator, qtype: str):
    """Return (specs, question, answer, check) for qtype; check(objects) re-validates after placement."""
    colors = list(COLORS)
    n_total = int(rng.integers(3, 8))  # 3..7 objects
    if qtype == "color":
        s = _choice(rng, SHAPES)
        target = (s, _choice(rng, colors), _rand_size(rng))
        specs = [target] + _fillers(rng, n_total - 1, lambda sp, _: sp[0] != s)
        return specs, f"what color is the {s}?", target[1]
    if qtype == "shape":
        c = _choice(rng, colors)
        target = (_choice(rng, SHAPES), c, _rand_size(rng))
        specs = [target] + _fillers(rng, n_total - 1, lambda sp, _: sp[1] != c)
        return specs, f"what shape is the {c} object?", target[0]
    if qtype == "count":
        s = _choice(rng, SHAPES)
        k = int(rng.integers(1, MAX_COUNT + 1))
        n_total = max(n_total, k + 1)
        specs = [(s, _choice(rng, colors), _rand_size(rng)) for _ in range(k)]
        specs += _fillers(rng, n_total - k, lambda sp, _: sp[0] != s)
        return specs, f"how many {PLURALS[s]} are there?", str(k)
    if qtype == "position":
        a = (_choice(rng, SHAPES), _choice(rng, colors), _rand_size(rng))
        while True:
            b = (_choice(rng, SHAPES), _choice(rng, colors), _rand_size(rng))
            if b[:2] != a[:2]:
                break
        combos = {a[:2], b[:2]}
        specs = [a, b] + _fillers(rng, n_total - 2, lambda sp, _: sp[:2] not in combos)
        return specs, (a, b), None  # question decided after placement
    if qtype == "exist":
        specs = _fillers(rng, n_total, lambda sp, _: True)
        present = {sp[:2] for sp in specs}
        if rng.random() < 0.5:
            s, c = _choice(rng, specs)[:2]
            return specs, f"is there a {c} {s}?", "yes"
        shapes_p = {sp[0] for sp in specs}
        colors_p = {sp[1] for sp in specs}
        hard = [(s, c) for s in shapes_p for c in colors_p if (s, c) not in present]
        if hard and rng.random() < 0.6:
            s, c = _choice(rng, hard)
        else:
            absent = [(s, c) for s in SHAPES for c in colors if (s, c) not in present]
            s, c = _choice(rng, absent)
        return specs, f"is there a {c} {s}?", "no"
    raise ValueError(f"unknown qtype {qtype!r}")


def _position_question(rng: np.random.Generator, objects: list[dict[str, Any]]):
    a, b = objects[0], objects[1]
    ax, ay = (a["bbox"][0] + a["bbox"][2]) / 2, (a["bbox"][1] + a["bbox"][3]) / 2
    bx, by = (b["bbox"][0] + b["bbox"][2]) / 2, (b["bbox"][1] + b["bbox"][3]) / 2
    axes = []
    if abs(ax - bx) >= MIN_SEP:
        axes.append("x")
    if abs(ay - by) >= MIN_SEP:
        axes.append("y")
    if not axes:
        return None
    axis = _choice(rng, axes)
    rel = _choice(rng, ["left of", "right of"] if axis == "x" else ["above", "below"])
    truth = {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}[rel]
    q = f"is the {a['color']} {a['shape']} {rel} the {b['color']} {b['shape']}?"
    return q, "yes" if truth else "no"


def make_example(split: str, seed: int, index: int, qtype: str | None = None) -> dict[str, Any]:
    """One deterministic example; qtype defaults to the balanced cycle QTYPES[index % 5]."""
    rng = _rng(split, seed, index)
    qtype = qtype or QTYPES[index % len(QTYPES)]
    for _ in range(100):
        specs, question, answer = _question(rng, qtype)
        objects = _place(rng, specs)
        if objects is None:
            continue
        if qtype == "position":
            qa = _position_question(rng, objects)
            if qa is None:
                continue
            question, answer = qa
        order = rng.permutation(len(objects))  # drawing / listing order carries no information
        objects = [objects[i] for i in order]
        image, bg = render(objects, rng)
        return {
            "question_id": f"synthvqa-{split}-{seed}-{index:06d}",
            "image": image,
            "question": question,
            "answer": answer,
            "qtype": qtype,
            "objects": objects,
            "background": bg,
        }
    raise RuntimeError(f"could not build a {qtype} scene for {(split, seed, index)}")


def generate_examples(split: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """The first n examples of a split (balanced over QTYPES by index)."""
    return [make_example(split, seed, i) for i in range(n)]


def iter_train(seed: int = 0, start: int = 0, step: int = 1) -> Iterator[dict[str, Any]]:
    """Unlimited training stream (disjoint from the test split); shard with start/step across workers."""
    i = start
    while True:
        yield make_example("train", seed, i)
        i += step


def words(text: str) -> list[str]:
    """Lowercase words with punctuation split off, as the tiny model's tokenizer sees them."""
    import re

    return re.findall(r"\w+|[^\w\s]+", text.lower())


def scene_questions(objects: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """Every unambiguous (question, answer, qtype) about a scene, in the test split's answer ranges.

    Used to ask several questions per training image; exist questions come as many "no" as "yes".
    """
    out: list[tuple[str, str, str]] = []
    shapes = [o["shape"] for o in objects]
    colors = [o["color"] for o in objects]
    for s in SHAPES:
        if shapes.count(s) == 1:
            out.append((f"what color is the {s}?", colors[shapes.index(s)], "color"))
        if 1 <= shapes.count(s) <= MAX_COUNT:
            out.append((f"how many {PLURALS[s]} are there?", str(shapes.count(s)), "count"))
    for c in COLORS:
        if colors.count(c) == 1:
            out.append((f"what shape is the {c} object?", shapes[colors.index(c)], "shape"))
    pairs = [(o["shape"], o["color"]) for o in objects]
    present = sorted(set(pairs))
    absent = [(s, c) for s in SHAPES for c in COLORS if (s, c) not in present]
    for i, (s, c) in enumerate(present):
        out.append((f"is there a {c} {s}?", "yes", "exist"))
        s2, c2 = absent[(i * 7 + len(objects)) % len(absent)]
        out.append((f"is there a {c2} {s2}?", "no", "exist"))
    uniq = [o for o in objects if pairs.count((o["shape"], o["color"])) == 1]
    for a in uniq:
        for b in uniq:
            if a is b:
                continue
            ax, ay = (a["bbox"][0] + a["bbox"][2]) / 2, (a["bbox"][1] + a["bbox"][3]) / 2
            bx, by = (b["bbox"][0] + b["bbox"][2]) / 2, (b["bbox"][1] + b["bbox"][3]) / 2
            rels = []
            if abs(ax - bx) >= MIN_SEP:
                rels += [("left of", ax < bx), ("right of", ax > bx)]
            if abs(ay - by) >= MIN_SEP:
                rels += [("above", ay < by), ("below", ay > by)]
            for rel, truth in rels:
                q = f"is the {a['color']} {a['shape']} {rel} the {b['color']} {b['shape']}?"
                out.append((q, "yes" if truth else "no", "position"))
    return out
