"""Small local datasets in the real schemas of lmms-eval's POPE, MME, TextVQA and GQA data (issue 26).

The columns and types are those of the hub datasets lmms-eval 0.7.3 reads (``lmms-lab-encoder/POPE``
default config, ``.../MME``, ``.../textvqa``, ``.../GQA`` testdev_balanced_instructions + _images, per
their dataset cards); the images are PIL-drawn SynthVQA scenes (bench.synthvqa.generator, its
``train`` stream, so never the test split) and the questions are the ones the embedded tiny model was
trained on, phrased the way each benchmark phrases them, so that its answers are not all wrong.
"""

from __future__ import annotations

from pathlib import Path

from bench.synthvqa.generator import make_example, scene_questions

#: seed of the SynthVQA train stream the scenes come from (disjoint from anything else the tests use)
SEED = 26


def _scenes(n: int, qtype: str | None = None):
    i = 0
    while n > 0:
        ex = make_example("train", SEED, i, qtype=qtype)
        i += 1
        yield ex
        n -= 1


def _features(spec: dict):
    import datasets

    def f(v):
        if v == "image":
            return datasets.Image()
        if isinstance(v, list):
            return datasets.Sequence(f(v[0]))
        if isinstance(v, dict):
            return {k: f(x) for k, x in v.items()}
        return datasets.Value(v)

    return datasets.Features({k: f(v) for k, v in spec.items()})


def _save(rows: list[dict], spec: dict, split: str, out: Path, fmt: str = "disk") -> Path:
    import datasets

    ds = datasets.Dataset.from_list(rows, features=_features(spec))
    assert list(ds.features) == list(spec)  # exactly the schema's columns, in its order
    if fmt == "disk":
        datasets.DatasetDict({split: ds}).save_to_disk(str(out))
    elif fmt == "snapshot":  # what huggingface-cli download gives: data/<split>-00000-of-00001.parquet
        (out / "data").mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(out / "data" / f"{split}-00000-of-00001.parquet"))
    elif fmt == "parquet":
        out.parent.mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(out))
    else:
        raise ValueError(fmt)
    return out


POPE_SCHEMA = {"id": "string", "question_id": "string", "question": "string", "answer": "string", "image_source": "string", "image": "image", "category": "string"}
MME_SCHEMA = {"question_id": "string", "image": "image", "question": "string", "answer": "string", "category": "string"}
TEXTVQA_SCHEMA = {
    "image_id": "string", "question_id": "int32", "question": "string", "question_tokens": ["string"], "image": "image",
    "image_width": "int32", "image_height": "int32", "flickr_original_url": "string", "flickr_300k_url": "string",
    "answers": ["string"], "image_classes": ["string"], "set_name": "string", "ocr_tokens": ["string"],
}  # fmt: skip
GQA_INSTRUCTIONS_SCHEMA = {
    "id": "string", "imageId": "string", "question": "string", "answer": "string", "fullAnswer": "string", "isBalanced": "bool",
    "groups": {"global": "string", "local": "string"}, "entailed": "string", "equivalent": "string",
    "types": {"structural": "string", "semantic": "string", "detailed": "string"},
    "annotations": {"question": [{"objectId": "string", "value": "string"}], "answer": [{"objectId": "string", "value": "string"}], "fullAnswer": [{"objectId": "string", "value": "string"}]},
    "semantic": [{"operation": "string", "argument": "string", "dependencies": ["int32"]}], "semanticStr": "string",
}  # fmt: skip
GQA_IMAGES_SCHEMA = {"id": "string", "image": "image"}


def pope(out: Path, n: int = 20) -> Path:
    """POPE's ``test`` split (default config: the three splits pooled, told apart by ``category``)."""
    cats = ("adversarial", "popular", "random")
    rows = []
    for i, ex in enumerate(_scenes(n, qtype="exist")):
        q = ex["question"][0].upper() + ex["question"][1:]
        rows.append({"id": str(i), "question_id": str(i % 7), "question": q, "answer": ex["answer"], "image_source": f"synth_{i:012d}", "image": ex["image"], "category": cats[i % 3]})
    return _save(rows, POPE_SCHEMA, "test", out)


def mme(out: Path, n: int = 20) -> Path:
    """MME's ``test`` split: two questions per image (``question_id`` = the image path, one Yes and
    one No, the pair acc+ scores), perception and cognition categories."""
    assert n % 2 == 0
    cats = ("existence", "count", "color", "position", "numerical_calculation", "commonsense_reasoning")
    rows = []
    for k, ex in enumerate(_scenes(n // 2)):
        cat = cats[k % len(cats)]
        qid = f"{cat}/{k:04d}.png"
        qs = [q for q in scene_questions(ex["objects"]) if q[2] == "exist"]
        yes = next(q for q in qs if q[1] == "yes")
        no = next(q for q in qs if q[1] == "no")
        for q, a, _ in (yes, no):
            rows.append({"question_id": qid, "image": ex["image"], "question": q[0].upper() + q[1:] + " Please answer yes or no.", "answer": a.capitalize(), "category": cat})
    return _save(rows, MME_SCHEMA, "test", out)


def textvqa(out: Path, n: int = 20) -> Path:
    """TextVQA's ``validation`` split as a hub snapshot directory (``data/validation-*.parquet``)."""
    rows = []
    for i, ex in enumerate(_scenes(n)):
        img = ex["image"]
        rows.append(
            {
                "image_id": f"{i:016x}", "question_id": 34602 + i, "question": ex["question"], "question_tokens": ex["question"].rstrip("?").split(),
                "image": img, "image_width": img.width, "image_height": img.height, "flickr_original_url": "", "flickr_300k_url": "",
                "answers": [ex["answer"]] * 10, "image_classes": [o["shape"] for o in ex["objects"]], "set_name": "val", "ocr_tokens": [],
            }
        )  # fmt: skip
    return _save(rows, TEXTVQA_SCHEMA, "validation", out, fmt="snapshot")


def gqa(out_instructions: Path, out_images: Path, n: int = 20) -> tuple[Path, Path]:
    """GQA testdev-balanced: the questions (no image column; ``imageId``) as a save_to_disk directory
    and the images (``id``, ``image``) as a parquet file, as lmms-eval's task joins them."""
    rows, images = [], {}
    for k, ex in enumerate(_scenes(n // 2)):
        image_id = f"n{100000 + k}"
        images[image_id] = ex["image"]
        qs = scene_questions(ex["objects"])
        for j, (question, answer, qtype) in enumerate([qs[0], qs[len(qs) // 2]]):  # two questions per image
            empty = {"objectId": [], "value": []}
            rows.append(
                {
                    "id": f"{20000000 + 2 * k + j}", "imageId": image_id, "question": question[0].upper() + question[1:], "answer": answer,
                    "fullAnswer": f"The answer is {answer}.", "isBalanced": True, "groups": {"global": qtype, "local": f"10c-{qtype}"},
                    "entailed": "", "equivalent": "", "types": {"structural": "query", "semantic": "attr", "detailed": qtype},
                    "annotations": {"question": empty, "answer": empty, "fullAnswer": empty},
                    "semantic": {"operation": ["select"], "argument": ["scene"], "dependencies": [[]]}, "semanticStr": "select: scene",
                }
            )  # fmt: skip
    _save(rows, GQA_INSTRUCTIONS_SCHEMA, "testdev", out_instructions)
    _save([{"id": k, "image": v} for k, v in images.items()], GQA_IMAGES_SCHEMA, "testdev", out_images, fmt="parquet")
    return out_instructions, out_images
