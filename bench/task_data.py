"""Where a benchmark's data comes from, and what identifies it (issue 26).

lmms-eval is used unforked. A benchmark config names an lmms-eval task (``benchmark.task``); these
Hydra fields point it at other data:

``benchmark.dataset_path``
    a local copy of the task's data: a directory written by ``datasets`` ``save_to_disk`` (a
    ``DatasetDict`` holding the task's split), a parquet file, or a directory ``datasets.load_dataset``
    reads (a hub snapshot from ``huggingface-cli download``, or ``data/<split>-*.parquet`` files); or a
    hub id (``org/name``) of another repository with the same schema. ``null``: the task's own hub
    dataset (from the Hugging Face cache when ``HF_HUB_OFFLINE=1``).
``benchmark.dataset_name``
    the hub config (subset) for a hub id or a snapshot directory; ``null`` keeps the task's.
``benchmark.image_dataset_path``
    GQA only: where the images are. lmms-eval's GQA task loads them from a second, hard-coded hub
    dataset (``lmms-lab-encoder/GQA``, ``testdev_balanced_images``) inside its ``process_docs``; the
    generated task replaces that hook with :func:`gqa_process_docs`, which joins the same way
    (``imageId`` -> ``id``) on this dataset instead, or keeps an ``image`` column the local data
    already has.
``benchmark.include_paths``
    extra lmms-eval task directories; ``benchmark.task`` may name a task defined there (it then wins
    over a built-in task of the same name: only these directories are indexed).

With a data override the harness writes a task YAML that ``include``\\ s the task's own YAML (its
prompts, hooks and metrics stay lmms-eval's) and overrides ``dataset_path`` / ``dataset_name`` /
``dataset_kwargs`` (``load_from_disk: true`` for a ``save_to_disk`` directory). It gets a new name,
``<task>__local_<digest>`` (``__hub_`` for another hub id): lmms-eval prefers its built-in task over a
same-named one in an include path, so a copy under the old name would silently read the hub data.

The run id follows the data actually evaluated: :attr:`TaskData.fingerprint` holds the lmms-eval
version, the task run, a digest of its YAML files (the include chain and the Python hooks they name),
the dataset's identity (``datasets``' fingerprint of a ``save_to_disk`` split, the hub revision
``datasets`` resolves, or the names, sizes and modification times of local files), the split, its
number of rows and ``limit``. A 20-item local POPE therefore never takes the run id of the full POPE.
SynthVQA keeps its generator fingerprint (``synthvqa-gen<version>``), so its records keep their ids.

Availability is checked here, before any model is loaded or anything is written: a missing local copy,
a missing split or an unreachable hub raises :class:`~bench.errors.ConfigError` (exit code 2) naming
the dataset and the fields to set.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.errors import ConfigError

#: the benchmark config fields this module reads (besides ``task`` and ``limit``)
DATA_FIELDS = ("dataset_path", "dataset_name", "image_dataset_path", "include_paths")

#: lmms-eval's GQA ``process_docs`` (tasks/gqa/utils.py) loads its images from this hub dataset;
#: tests check that the installed utils.py still names it
GQA_IMAGES = {"path": "lmms-lab-encoder/GQA", "name": "testdev_balanced_images", "split": "testdev"}
#: the hook that loads them (a task whose YAML names it gets the image handling above)
GQA_HOOK = "gqa_process_docs"

#: dataset_kwargs keys lmms-eval consumes itself (not passed to ``datasets``)
_LMMS_KWARGS = ("load_from_disk", "From_YouTube", "video", "builder_script", "force_download", "force_unzip", "local_files_only", "create_link", "max_retries", "num_proc")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

FIELDS_HINT = (
    "set benchmark.dataset_path to a local copy (a `datasets` save_to_disk directory, a parquet file or a hub "
    "snapshot directory), or copy the Hugging Face cache from an online machine and set HF_HUB_OFFLINE=1 "
    "(README: \"Benchmarks on an offline cluster\")"
)


@dataclass(frozen=True)
class TaskData:
    """What :func:`resolve` found for one benchmark config."""

    task: str  # the lmms-eval task simple_evaluate is asked for (generated name with a data override)
    include_paths: tuple[str, ...]  # TaskManager(include_path=...); built-in tasks are never all indexed
    fingerprint: str  # enters the run id (bench.records.run_id)
    info: dict[str, Any] = field(compare=False)  # the record's ``data`` field (bench.schema.Data)


def resolve(bcfg: dict[str, Any]) -> TaskData:
    """The task to run and its data identity for benchmark config ``bcfg``; raises ConfigError.

    Cached per process on the fields that decide it (a sweep resolves each benchmark once).
    """
    keys = ("name", "task", "limit", "limit_multiple", *DATA_FIELDS)
    return _resolve(json.dumps({k: bcfg.get(k) for k in keys}, sort_keys=True, default=str))


def task_manager(td: TaskData):
    """lmms-eval's TaskManager that knows ``td.task`` (indexes only its directories: no 10 s index of
    every built-in task)."""
    from lmms_eval.tasks import TaskManager

    paths = list(td.include_paths)
    if td.task == "synthvqa" and not paths:
        from bench.tasks.synthvqa import prepare_task_dir

        paths = [str(prepare_task_dir())]  # generated on first use, not when a run id is computed
    return TaskManager(include_path=paths, include_defaults=False, verbosity="ERROR")


# ----------------------------------------------------------------------------- resolution
@functools.lru_cache(maxsize=64)
def _resolve(key: str) -> TaskData:
    b = json.loads(key)
    task = b.get("task")
    if not isinstance(task, str) or not task:
        raise ConfigError(f"benchmark {b.get('name')!r}: benchmark.task must name an lmms-eval task, got {task!r}")
    if task == "synthvqa":
        return _synthvqa(b)
    _check_limit(b)
    includes = _include_dirs(b)
    base_yaml, own_dir = _locate(task, includes, b)
    base = _load_simple(base_yaml)
    override, note = _override(b, base)
    gqa = _uses_hook(base, GQA_HOOK)
    images = None
    if b.get("image_dataset_path") and not gqa:
        raise ConfigError(f"benchmark {b.get('name')!r}: benchmark.image_dataset_path only applies to GQA-style tasks (process_docs {GQA_HOOK}); task {task!r} reads its images from its own dataset")
    if gqa and (override or b.get("image_dataset_path")):
        images = _image_spec(b)
    if override or images is not None:
        name, yaml_path = _write_task(task, base_yaml, override, images, local=note == "local")
        task_dirs: tuple[str, ...] = (str(yaml_path.parent),)
    else:
        name, yaml_path = task, base_yaml
        task_dirs = (str(own_dir),)
    eff = _load_simple(yaml_path)
    split = eff.get("test_split") or eff.get("validation_split")
    if not split:
        raise ConfigError(f"lmms-eval task {task!r} ({base_yaml}) names no test_split or validation_split")
    label = _label(b, eff)
    data = dataset_identity(eff.get("dataset_path"), eff.get("dataset_name"), eff.get("dataset_kwargs") or {}, split, label=label, bench=b.get("name"))
    img_info = None
    if gqa:
        if images is None:  # lmms-eval's own hook: the hard-coded hub dataset
            images = {"path": GQA_IMAGES["path"], "name": GQA_IMAGES["name"], "split": GQA_IMAGES["split"], "kwargs": {"token": True}}
        if "image" in (data.get("columns") or ()):
            img_info = {"origin": "embedded", "note": "the local data has an image column; no second dataset is read", "fingerprint": "embedded"}
        else:
            img_info = dataset_identity(images["path"], images.get("name"), images.get("kwargs") or {}, images["split"], label=images.get("label", "benchmark.image_dataset_path"), bench=b.get("name"))
            img_info.pop("columns", None)
    data.pop("columns", None)
    digest = yaml_digest(yaml_path)
    version = _lmms_version()
    n = data.get("n_items")
    identity = f"{data['origin']}:{data['fingerprint']}:split={split}:n={n}" + (f":images={img_info['fingerprint']}" if img_info else "")
    fp = f"lmms_eval-{version}:{name}:yaml={digest}:data={identity}:limit={b.get('limit')}"
    info = {"task": name, **data, "split": split, "task_yaml_digest": digest, "identity": identity}
    if img_info:
        info["images"] = img_info
    return TaskData(task=name, include_paths=task_dirs + tuple(d for d in includes if d not in task_dirs), fingerprint=fp, info=info)


def _synthvqa(b: dict[str, Any]) -> TaskData:
    from bench.synthvqa.generator import GENERATOR_VERSION, TEST_SIZE

    set_fields = [f for f in DATA_FIELDS if b.get(f)]
    if set_fields:
        raise ConfigError(f"benchmark synthvqa is generated by the harness (bench/synthvqa); {', '.join('benchmark.' + f for f in set_fields)} do not apply to it")
    fp = f"synthvqa-gen{GENERATOR_VERSION}"  # unchanged since the first records: their run ids stay
    info = {"task": "synthvqa", "origin": "generated", "dataset_path": None, "dataset_name": None, "split": "test", "n_items": TEST_SIZE, "fingerprint": fp, "revision": None, "identity": fp}
    return TaskData(task="synthvqa", include_paths=(), fingerprint=fp, info=info)


def _check_limit(b: dict[str, Any]) -> None:
    mult = b.get("limit_multiple") or 1
    lim = b.get("limit")
    if lim is not None and isinstance(lim, int) and lim % int(mult):
        raise ConfigError(
            f"benchmark {b.get('name')!r} scores its questions in groups of {mult} (benchmark.limit_multiple; MME's acc+ needs both "
            f"questions of an image), so benchmark.limit must be a multiple of {mult}, got {lim}"
        )


def _include_dirs(b: dict[str, Any]) -> tuple[str, ...]:
    inc = b.get("include_paths") or []
    if isinstance(inc, str):
        inc = [inc]
    out = []
    for p in inc:
        d = Path(str(p)).expanduser().resolve()
        if not d.is_dir():
            raise ConfigError(f"benchmark {b.get('name')!r}: benchmark.include_paths entry {p!r} is not a directory")
        out.append(str(d))
    return tuple(out)


def builtin_tasks_dir() -> Path:
    """lmms-eval's task directory, found without importing lmms_eval (that import takes seconds)."""
    import importlib.util

    spec = importlib.util.find_spec("lmms_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("lmms-eval is not installed: only benchmark=synthvqa can run")
    return Path(list(spec.submodule_search_locations)[0]).resolve() / "tasks"


def _locate(task: str, includes: tuple[str, ...], b: dict[str, Any]) -> tuple[Path, Path]:
    """``(yaml defining task, directory to index)``: the include paths first, then lmms-eval's tasks."""
    for d in includes:
        hit = _find_task_yaml(task, Path(d))
        if hit is not None:
            return hit, Path(d)
    hit = _find_task_yaml(task, builtin_tasks_dir())
    if hit is not None:
        return hit, hit.parent
    where = "lmms-eval's tasks" + (f" or benchmark.include_paths ({', '.join(includes)})" if includes else "")
    raise ConfigError(f"benchmark {b.get('name')!r}: no lmms-eval task named {task!r} in {where}; set benchmark.task to a task name, or benchmark.include_paths to the directory defining it")


@functools.lru_cache(maxsize=8)
def _task_index(root: str) -> dict[str, str]:
    """``{task name: yaml path}`` of the task configs under ``root`` (``task: <name>`` at top level).

    A text scan: lmms-eval's TaskManager parses every YAML (about 10 s for the built-in tasks); the
    hit is then parsed for real.
    """
    pat = re.compile(r"^task:\s*['\"]?([^'\"\s#]+)['\"]?\s*(?:#.*)?$", re.M)
    out: dict[str, str] = {}
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("__pycache__", ".ipynb_checkpoints"))
        for f in sorted(files):
            if f.endswith(".yaml"):
                p = os.path.join(dirpath, f)
                try:
                    m = pat.search(Path(p).read_text(encoding="utf-8", errors="replace"))
                except OSError:
                    continue
                if m:
                    out.setdefault(m.group(1), p)
    return out


def _find_task_yaml(task: str, root: Path) -> Path | None:
    p = _task_index(str(root)).get(task)
    return Path(p) if p else None


class _IgnoreTags(yaml.SafeLoader):
    """Reads lmms-eval task YAMLs without importing their hooks: ``!function m.f`` -> ``"!function m.f"``."""


_IgnoreTags.add_multi_constructor("!", lambda loader, suffix, node: f"!{suffix} {node.value}" if isinstance(getattr(node, "value", None), str) else None)


def _load_simple(path: Path) -> dict[str, Any]:
    """A task YAML with its includes merged, ``!function x`` kept as the string ``'!function x'``."""
    cfg = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_IgnoreTags) or {}
    inc = cfg.pop("include", None)
    if inc is None:
        return cfg
    merged: dict[str, Any] = {}
    for p in reversed([inc] if isinstance(inc, str) else list(inc)):
        q = Path(p) if os.path.isfile(p) else Path(path).parent / p
        merged.update(_load_simple(q))
    merged.update(cfg)
    return merged


def _uses_hook(cfg: dict[str, Any], hook: str) -> bool:
    v = cfg.get("process_docs")
    return isinstance(v, str) and v.split(".")[-1].strip() == hook


def _override(b: dict[str, Any], base: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The dataset fields of the generated task, and ``local`` / ``hub`` (``({}, None)``: none)."""
    path, name = b.get("dataset_path"), b.get("dataset_name")
    if not path:
        if name:
            return {"dataset_name": name}, "hub"
        return {}, None
    p = Path(str(path)).expanduser()
    split = base.get("test_split") or base.get("validation_split")
    if p.exists():
        p = p.resolve()
        if p.is_dir() and (p / "dataset_dict.json").exists():
            return {"dataset_path": str(p), "dataset_name": None, "dataset_kwargs": {"load_from_disk": True}}, "local"
        if p.is_dir() and (p / "state.json").exists():
            raise ConfigError(
                f"benchmark {b.get('name')!r}: benchmark.dataset_path {str(p)!r} holds a single datasets.Dataset; lmms-eval reads a DatasetDict "
                f"from a save_to_disk directory: save it as DatasetDict({{{split!r}: dataset}}).save_to_disk(...)"
            )
        if p.is_file():
            builder = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json", ".csv": "csv"}.get(p.suffix)
            if builder is None:
                raise ConfigError(f"benchmark {b.get('name')!r}: benchmark.dataset_path {str(p)!r} is a file lmms-eval cannot read as the {split!r} split (parquet, arrow, json or csv)")
            return {"dataset_path": builder, "dataset_name": None, "dataset_kwargs": {"data_files": {split: str(p)}}}, "local"
        return {"dataset_path": str(p), "dataset_name": name, "dataset_kwargs": {}}, "local"
    if _HUB_ID.match(str(path)) and not str(path).startswith((".", "~")):
        kw = {k: v for k, v in (base.get("dataset_kwargs") or {}).items() if k == "token"}
        return {"dataset_path": str(path), "dataset_name": name if name is not None else base.get("dataset_name"), "dataset_kwargs": kw}, "hub"
    raise ConfigError(f"benchmark {b.get('name')!r}: benchmark.dataset_path {str(path)!r} does not exist (a local copy of the {b.get('task')!r} data was expected); {FIELDS_HINT}")


def _image_spec(b: dict[str, Any]) -> dict[str, Any]:
    """Where the generated GQA task's :func:`gqa_process_docs` reads images from."""
    path = b.get("image_dataset_path")
    if not path:
        return {"path": GQA_IMAGES["path"], "name": GQA_IMAGES["name"], "split": GQA_IMAGES["split"], "kwargs": {"token": True}, "label": "benchmark.image_dataset_path"}
    p = Path(str(path)).expanduser()
    if p.exists():
        p = p.resolve()
        if p.is_dir() and (p / "dataset_dict.json").exists():
            return {"path": str(p), "name": None, "split": GQA_IMAGES["split"], "kwargs": {"load_from_disk": True}, "label": "benchmark.image_dataset_path"}
        if p.is_file() and p.suffix == ".parquet":
            return {"path": "parquet", "name": None, "split": GQA_IMAGES["split"], "kwargs": {"data_files": {GQA_IMAGES["split"]: str(p)}}, "label": "benchmark.image_dataset_path"}
        if p.is_dir():
            return {"path": str(p), "name": None, "split": GQA_IMAGES["split"], "kwargs": {}, "label": "benchmark.image_dataset_path"}
    if _HUB_ID.match(str(path)):
        return {"path": str(path), "name": GQA_IMAGES["name"], "split": GQA_IMAGES["split"], "kwargs": {}, "label": "benchmark.image_dataset_path"}
    raise ConfigError(f"benchmark {b.get('name')!r}: benchmark.image_dataset_path {str(path)!r} does not exist (GQA's images: a save_to_disk directory with a {GQA_IMAGES['split']!r} split of id + image, a parquet file, or a hub snapshot)")


def _label(b: dict[str, Any], eff: dict[str, Any]) -> str:
    return "benchmark.dataset_path" if b.get("dataset_path") else f"the task's dataset {eff.get('dataset_path')}"


_TASK_YAML = """\
# generated by bench.task_data (issue 26): lmms-eval's task {base_task!r} on other data; do not edit
include: {include}
task: {task}
{fields}"""

_GQA_UTILS = """\
# generated by bench.task_data: GQA's images from {where}
from bench.task_data import gqa_process_docs as _join

_SPEC = {spec}


def gqa_process_docs(dataset):
    return _join(dataset, _SPEC)
"""


def generated_tasks_dir() -> Path:
    from bench.synthvqa.data import cache_root

    return cache_root() / "lmms_tasks"


def _write_task(task: str, base_yaml: Path, override: dict[str, Any], images: dict[str, Any] | None, local: bool) -> tuple[str, Path]:
    spec = {"base": str(base_yaml), "override": override, "images": images}
    digest = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    name = f"{task}__{'local' if local or (images and images['path'] != GQA_IMAGES['path']) else 'hub'}_{digest}"
    lines = [f"{k}: {json.dumps(v)}" for k, v in override.items()]  # JSON is YAML: paths quoted safely
    if images is not None:
        lines.append("process_docs: !function utils.gqa_process_docs")
    text = _TASK_YAML.format(base_task=task, include=json.dumps(str(base_yaml)), task=json.dumps(name), fields="".join(line + "\n" for line in lines))
    d = generated_tasks_dir() / name
    d.mkdir(parents=True, exist_ok=True)
    if images is not None:
        where = images["path"] + (f" ({images['name']})" if images.get("name") else "")
        _write_if_changed(d / "utils.py", _GQA_UTILS.format(where=where, spec=repr({k: v for k, v in images.items() if k != "label"})))
    _write_if_changed(d / f"{name}.yaml", text)
    return name, d / f"{name}.yaml"


def _write_if_changed(path: Path, text: str) -> None:
    if path.exists() and path.read_text() == text:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- identity
def yaml_digest(yaml_path: Path) -> str:
    """sha256 (12 hex) of a task's YAML files (the include chain) and the Python files of the
    ``!function`` hooks they name: what decides prompts, post-processing and metrics."""
    h = hashlib.sha256()
    for p in _task_files(Path(yaml_path)):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def _task_files(path: Path, seen: set[Path] | None = None) -> list[Path]:
    import importlib.util

    seen = set() if seen is None else seen
    if path in seen:
        return []
    seen.add(path)
    files = [path]
    text = path.read_text(encoding="utf-8")
    for mod in sorted(set(re.findall(r"!function\s+([\w.]+)\.\w+", text))):
        local = path.parent / f"{mod.replace('.', '/')}.py"
        if local.is_file():
            files.append(local)
            continue
        try:
            spec = importlib.util.find_spec(mod)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.origin and os.path.isfile(spec.origin):
            files.append(Path(spec.origin))
    cfg = yaml.load(text, Loader=_IgnoreTags) or {}
    inc = cfg.get("include")
    for p in ([inc] if isinstance(inc, str) else list(inc or [])):
        q = Path(p) if os.path.isfile(p) else path.parent / p
        files += _task_files(q.resolve(), seen)
    return files


def _file_stats_digest(paths: list[Path], root: Path | None = None) -> str:
    """What ``datasets`` itself uses to tell local data files apart: name, size, modification time."""
    h = hashlib.sha256()
    for p in sorted(paths):
        st = p.stat()
        rel = str(p.relative_to(root)) if root else p.name
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _parquet_rows(paths: list[Path]) -> int | None:
    try:
        import pyarrow.parquet as pq

        return sum(pq.ParquetFile(str(p)).metadata.num_rows for p in paths)
    except Exception:  # noqa: BLE001 - not parquet: the row count stays unknown
        return None


def _parquet_columns(paths: list[Path]) -> list[str] | None:
    try:
        import pyarrow.parquet as pq

        return list(pq.read_schema(str(paths[0])).names) if paths else None
    except Exception:  # noqa: BLE001
        return None


def dataset_identity(path: str | None, name: str | None, kwargs: dict[str, Any], split: str, label: str, bench: str | None = None) -> dict[str, Any]:
    """Check that the split lmms-eval will load exists and say what it is, without loading it.

    Returns ``{origin, dataset_path, dataset_name, n_items, fingerprint, revision, columns}``; raises
    ConfigError naming the dataset and the fields to set when it is not available.
    """
    what = f"benchmark {bench!r}: " if bench else ""
    kwargs = dict(kwargs or {})
    if not path:
        raise ConfigError(f"{what}the task names no dataset_path; {FIELDS_HINT}")
    if kwargs.get("load_from_disk"):
        return _from_disk(Path(path), split, label, what)
    if kwargs.get("data_files") is not None and (path in ("parquet", "arrow", "json", "csv", "text", "pandas") or os.path.isdir(path)):
        files = kwargs["data_files"]
        sel = files.get(split) if isinstance(files, dict) else files
        if sel is None:
            raise ConfigError(f"{what}{label}: the data_files name no {split!r} split (they name {sorted(files) if isinstance(files, dict) else files})")
        paths = [Path(p) for p in ([sel] if isinstance(sel, str) else sel)]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise ConfigError(f"{what}{label}: {', '.join(missing)} does not exist; {FIELDS_HINT}")
        return {"origin": "local", "dataset_path": ", ".join(str(p) for p in paths), "dataset_name": None, "n_items": _parquet_rows(paths), "fingerprint": "files-" + _file_stats_digest(paths), "revision": None, "columns": _parquet_columns(paths)}
    if os.path.isdir(path):
        return _from_local_dir(Path(path), name, split, label, what)
    return _from_hub(path, name, kwargs, split, label, what)


def _from_disk(p: Path, split: str, label: str, what: str) -> dict[str, Any]:
    import datasets

    if not p.exists():
        raise ConfigError(f"{what}{label} {str(p)!r} does not exist; {FIELDS_HINT}")
    if not (p / "dataset_dict.json").exists():
        raise ConfigError(f"{what}{label} {str(p)!r} is not a directory written by DatasetDict.save_to_disk (no dataset_dict.json)")
    try:
        dd = datasets.load_from_disk(str(p))
    except Exception as e:  # noqa: BLE001 - a corrupt copy
        raise ConfigError(f"{what}{label} {str(p)!r} cannot be read by datasets.load_from_disk: {type(e).__name__}: {e}") from None
    if split not in dd:
        raise ConfigError(f"{what}{label} {str(p)!r} has the splits {sorted(dd)}, but the task evaluates the {split!r} split; save the data under that split name")
    ds = dd[split]
    return {"origin": "local", "dataset_path": str(p), "dataset_name": None, "n_items": ds.num_rows, "fingerprint": f"datasets-{ds._fingerprint}", "revision": None, "columns": list(ds.column_names)}


def _from_local_dir(p: Path, name: str | None, split: str, label: str, what: str) -> dict[str, Any]:
    import datasets

    try:
        builder = datasets.load_dataset_builder(str(p), name)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{what}{label} {str(p)!r} cannot be read by datasets.load_dataset: {type(e).__name__}: {e}") from None
    data_files = getattr(builder.config, "data_files", None) or {}
    if data_files and split not in data_files:
        raise ConfigError(f"{what}{label} {str(p)!r} has the splits {sorted(data_files)}, but the task evaluates the {split!r} split (name its files {split}-*.parquet or data/{split}-*)")
    files = [Path(f) for f in data_files.get(split, [])] if data_files else sorted(q for q in p.rglob("*") if q.is_file())
    splits = builder.info.splits or {}
    n = splits[split].num_examples if split in splits and splits[split].num_examples else _parquet_rows(files)
    cols = list(builder.info.features) if builder.info.features else _parquet_columns(files)
    return {"origin": "local", "dataset_path": str(p), "dataset_name": name, "n_items": n, "fingerprint": "files-" + _file_stats_digest(files, p), "revision": None, "columns": cols}


def _from_hub(path: str, name: str | None, kwargs: dict[str, Any], split: str, label: str, what: str) -> dict[str, Any]:
    import datasets

    kw = {k: v for k, v in kwargs.items() if k not in _LMMS_KWARGS and k not in ("cache_dir",)}
    dc = datasets.DownloadConfig(max_retries=1)
    try:
        builder = datasets.load_dataset_builder(path, name, cache_dir=kwargs.get("cache_dir") or _lmms_cache_dir(), download_config=dc, **kw)
    except Exception as e:  # noqa: BLE001 - unreachable hub, not cached, no such repo or config, no token
        offline = datasets.config.HF_HUB_OFFLINE
        why = "HF_HUB_OFFLINE is set and it is not in the Hugging Face cache" if offline else "the hub cannot be reached or does not have it, and it is not in the Hugging Face cache"
        raise ConfigError(
            f"{what}the dataset {path}" + (f" (config {name})" if name else "") + f", split {split!r}, is not available: {why} "
            f"({type(e).__name__}: {str(e)[:200]}); {FIELDS_HINT}"
        ) from None
    splits = builder.info.splits or {}
    if splits and split not in splits:
        raise ConfigError(f"{what}the dataset {path}" + (f" (config {name})" if name else "") + f" has the splits {sorted(splits)}, not {split!r}; set benchmark.dataset_name or benchmark.dataset_path")
    n = splits[split].num_examples if split in splits else None
    rev = getattr(builder, "hash", None)
    return {"origin": "hub", "dataset_path": path, "dataset_name": name, "n_items": n, "fingerprint": f"{path}@{rev}" + (f"/{name}" if name else ""), "revision": rev, "columns": list(builder.info.features) if builder.info.features else None}


def _lmms_cache_dir() -> str | None:
    """The datasets cache lmms-eval loads from (LMMS_EVAL_DATASETS_CACHE, else HF_DATASETS_CACHE)."""
    try:
        from lmms_eval.api.task import _resolve_hf_datasets_cache_dir

        return _resolve_hf_datasets_cache_dir()
    except Exception:  # noqa: BLE001 - another lmms-eval release: datasets' own default
        return None


def _lmms_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lmms_eval")
    except PackageNotFoundError:
        return "unknown"


# ----------------------------------------------------------------------------- GQA's images
def load_split(spec: dict[str, Any]):
    """The ``datasets.Dataset`` of an image spec (see :func:`_image_spec`)."""
    import datasets

    kw = dict(spec.get("kwargs") or {})
    if kw.pop("load_from_disk", False):
        return datasets.load_from_disk(spec["path"])[spec["split"]]
    return datasets.load_dataset(spec["path"], spec.get("name"), split=spec["split"], **kw)


def gqa_process_docs(dataset, spec: dict[str, Any]):
    """lmms-eval's GQA ``process_docs`` with the image source as an argument: each question gets the
    image whose ``id`` is its ``imageId`` (converted to RGB, as lmms-eval's hook does). A dataset that
    already has an ``image`` column is returned as it is."""
    if "image" in dataset.column_names:
        return dataset
    id2image = {row["id"]: row["image"].convert("RGB") for row in load_split(spec)}
    missing = sorted({i for i in dataset["imageId"] if i not in id2image})
    if missing:
        raise ConfigError(f"GQA: {len(missing)} imageId(s) have no image in {spec['path']} (first: {missing[:3]})")
    return dataset.map(lambda doc: {"image": id2image[doc["imageId"]]})
