"""SynthVQA's fixed test split as a parquet file in the cache (generated once, reused, versioned).

The file lives at ``{cache}/synthvqa/v{GENERATOR_VERSION}/test.parquet`` where ``cache`` is the argument,
else ``$BENCH_CACHE``, else ``~/.cache/tokenprune-bench``; a new generator version therefore never reuses
stale data.  Columns: question_id, image ({"bytes": PNG, "path": None}, tagged as a datasets ``Image``
feature so ``datasets`` decodes it to PIL), question, answer, qtype, objects (JSON string).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

from bench.synthvqa.generator import GENERATOR_VERSION, TEST_SEED, TEST_SIZE, generate_examples

FEATURES = {
    "question_id": {"dtype": "string", "_type": "Value"},
    "image": {"_type": "Image"},
    "question": {"dtype": "string", "_type": "Value"},
    "answer": {"dtype": "string", "_type": "Value"},
    "qtype": {"dtype": "string", "_type": "Value"},
    "objects": {"dtype": "string", "_type": "Value"},
}


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser().resolve()
    env = os.environ.get("BENCH_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    return (Path.home() / ".cache" / "tokenprune-bench").resolve()


def data_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    return cache_root(cache_dir) / "synthvqa" / f"v{GENERATOR_VERSION}"


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def ensure_test_parquet(cache_dir: str | os.PathLike | None = None, n: int = TEST_SIZE) -> Path:
    """Path of the test split's parquet, generating it (atomically) if it is not in the cache yet.

    ``n`` other than the default writes ``test-{n}.parquet`` (a prefix of the same split, for tests).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir = data_dir(cache_dir)
    path = out_dir / ("test.parquet" if n == TEST_SIZE else f"test-{n}.parquet")
    if path.exists():
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = generate_examples("test", n, TEST_SEED)
    table = pa.table(
        {
            "question_id": [r["question_id"] for r in rows],
            "image": pa.array(
                [{"bytes": _png(r["image"]), "path": None} for r in rows],
                type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
            ),
            "question": [r["question"] for r in rows],
            "answer": [r["answer"] for r in rows],
            "qtype": [r["qtype"] for r in rows],
            "objects": [json.dumps(r["objects"]) for r in rows],
        }
    )
    meta = {
        b"huggingface": json.dumps({"info": {"features": FEATURES}}).encode(),
        b"synthvqa_generator_version": str(GENERATOR_VERSION).encode(),
    }
    table = table.replace_schema_metadata(meta)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_test(cache_dir: str | os.PathLike | None = None, n: int = TEST_SIZE) -> list[dict]:
    """The test split as dicts with decoded PIL images and parsed objects (no datasets needed)."""
    import pyarrow.parquet as pq
    from PIL import Image

    rows = pq.read_table(ensure_test_parquet(cache_dir, n)).to_pylist()
    for r in rows:
        r["image"] = Image.open(io.BytesIO(r["image"]["bytes"])).convert("RGB")
        r["objects"] = json.loads(r["objects"])
    return rows
