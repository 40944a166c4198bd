"""Benchmarks on local data, run ids that know their data, clear offline errors (issue 26): fast checks.

The end-to-end runs of the real tasks on local data are in tests/test_local_benchmarks.py (slow).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from bench import task_data
from bench.errors import ConfigError
from bench.records import run_id
from bench.build import benchmark_fingerprint, compose_config

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import task_schemas  # noqa: E402

BENCHMARKS = sorted(p.stem for p in (ROOT / "conf" / "benchmark").glob("*.yaml"))


def bcfg(name: str, *overrides: str) -> dict:
    return compose_config([f"benchmark={name}", *overrides])["benchmark"]


@pytest.fixture(scope="module")
def local_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("local-data")
    return {"pope": task_schemas.pope(d / "pope"), "pope12": task_schemas.pope(d / "pope12", n=12), "mme": task_schemas.mme(d / "mme"), "root": d}


# ----------------------------------------------------------------------------- configs vs lmms-eval
@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_config_resolves_against_installed_lmms_eval(name):
    """Every conf/benchmark/*.yaml names a task and metrics the installed lmms-eval defines: a renamed
    task or metric fails here, not on a user's cluster."""
    from lmms_eval.tasks import TaskManager

    b = bcfg(name)
    if name == "synthvqa":
        from bench.tasks.synthvqa import prepare_task_dir

        tm = TaskManager(include_path=str(prepare_task_dir(n=8)), include_defaults=False, verbosity="ERROR")
    else:
        yaml_path, own_dir = task_data._locate(b["task"], (), b)
        tm = TaskManager(include_path=str(own_dir), include_defaults=False, verbosity="ERROR")
    assert b["task"] in tm.all_subtasks, f"lmms-eval has no task {b['task']!r}"
    cfg = tm._get_config(b["task"])  # full mode: the hooks import
    metrics = {m["metric"] for m in cfg["metric_list"]}
    wanted = set(b.get("metric_components") or [b["metric"]])
    assert wanted <= metrics, f"{name}: {sorted(wanted - metrics)} not among the task's metrics {sorted(metrics)}"
    assert cfg.get("test_split") or cfg.get("validation_split")
    if name != "synthvqa":
        for f in ("dataset_path", "dataset_name", "include_paths"):
            assert f in b, f"conf/benchmark/{name}.yaml lacks the data field {f}"
        assert callable(cfg["doc_to_visual"]) and cfg["output_type"] == "generate_until"


def test_benchmark_config_comments_say_what_each_metric_is():
    for name in BENCHMARKS:
        text = (ROOT / "conf" / "benchmark" / f"{name}.yaml").read_text()
        b = yaml.safe_load(text)
        for m in b.get("metric_components") or [b["metric"]]:
            comments = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
            assert m in comments or name == "synthvqa", f"conf/benchmark/{name}.yaml: no comment explains {m}"


def test_gqa_images_are_where_lmms_eval_loads_them():
    """The hard-coded second dataset of lmms-eval's GQA hook is the one task_data checks and replaces."""
    src = (task_data.builtin_tasks_dir() / "gqa" / "utils.py").read_text()
    assert f'"{task_data.GQA_IMAGES["path"]}", "{task_data.GQA_IMAGES["name"]}", split="{task_data.GQA_IMAGES["split"]}"' in src
    assert f"def {task_data.GQA_HOOK}(" in src


# ----------------------------------------------------------------------------- generated tasks
def test_local_copy_gets_a_new_task_name_with_lmms_evals_hooks(local_data):
    """A same-named task in an include path loses to the built-in one, so the override has its own
    name; it keeps pope's prompts, hooks and metrics and only changes where the data comes from."""
    from lmms_eval import utils as lmms_utils
    from lmms_eval.tasks import TaskManager

    td = task_data.resolve(bcfg("pope", f"benchmark.dataset_path={local_data['pope']}"))
    assert td.task.startswith("pope__local_") and td.task != "pope"
    tm = task_data.task_manager(td)
    assert td.task in tm.all_subtasks and "pope" not in tm.all_subtasks  # built-in tasks are not indexed
    cfg = tm._get_config(td.task)
    builtin = lmms_utils.load_yaml_config(str(task_data.builtin_tasks_dir() / "pope" / "pope.yaml"), mode="full")
    assert cfg["dataset_path"] == str(local_data["pope"]) and cfg["dataset_kwargs"] == {"load_from_disk": True} and cfg["dataset_name"] is None
    assert cfg["doc_to_visual"].__name__ == "pope_doc_to_visual" and cfg["process_results"].__name__ == "pope_process_results"
    assert [m["metric"] for m in cfg["metric_list"]] == [m["metric"] for m in builtin["metric_list"]]
    assert cfg["test_split"] == builtin["test_split"] == "test"
    # lmms-eval itself loads the data through that task (load_from_disk) with every row of the copy
    task = tm.load_task_or_group([td.task])[td.task]
    assert len(task.test_docs()) == 20 and task.test_docs()[0]["image"].size == (336, 336)


def test_include_paths_task_wins_over_builtin_of_same_name(tmp_path, local_data):
    """benchmark.include_paths: a user's own task is found there (issue: benchmark.task=pope_local was a KeyError)."""
    d = tmp_path / "mytasks"
    d.mkdir()
    builtin = task_data.builtin_tasks_dir() / "pope" / "pope.yaml"
    (d / "pope_local.yaml").write_text(f'include: "{builtin}"\ntask: pope_local\ndataset_path: "{local_data["pope"]}"\ndataset_kwargs: {{load_from_disk: true}}\n')
    td = task_data.resolve(bcfg("pope", "benchmark.task=pope_local", f"benchmark.include_paths=[{d}]"))
    assert td.task == "pope_local" and td.info["origin"] == "local" and td.info["n_items"] == 20
    assert td.task in task_data.task_manager(td).all_subtasks
    with pytest.raises(ConfigError, match="no lmms-eval task named 'pope_lokal'.*benchmark.include_paths"):
        task_data.resolve(bcfg("pope", "benchmark.task=pope_lokal", f"benchmark.include_paths=[{d}]"))


def test_gqa_images_come_from_the_local_image_dataset(tmp_path):
    """GQA's hook loads images from a second hub dataset; with a local copy the generated task joins
    the questions with image_dataset_path instead (imageId -> id), as lmms-eval's hook does."""
    q, imgs = task_schemas.gqa(tmp_path / "gqa", tmp_path / "gqa_images.parquet", n=8)
    td = task_data.resolve(bcfg("gqa", f"benchmark.dataset_path={q}", f"benchmark.image_dataset_path={imgs}"))
    assert td.task.startswith("gqa__local_") and td.info["images"]["origin"] == "local" and td.info["images"]["n_items"] == 4
    task = task_data.task_manager(td).load_task_or_group([td.task])[td.task]
    docs = task.test_docs()
    import datasets

    images = datasets.load_dataset("parquet", data_files=str(imgs), split="train")
    by_id = {r["id"]: r["image"] for r in images}
    assert len(docs) == 8
    for doc in docs:
        assert list(doc["image"].convert("RGB").getdata()) == list(by_id[doc["imageId"]].convert("RGB").getdata())
    with pytest.raises(ConfigError, match="image_dataset_path.*does not exist"):
        task_data.resolve(bcfg("gqa", f"benchmark.dataset_path={q}", f"benchmark.image_dataset_path={tmp_path / 'nope'}"))
    with pytest.raises(ConfigError, match="only applies to GQA"):
        task_data.resolve({**bcfg("pope"), "image_dataset_path": str(imgs)})


# ----------------------------------------------------------------------------- fingerprints and run ids
def test_fingerprint_follows_the_data(local_data, tmp_path):
    full = bcfg("pope", f"benchmark.dataset_path={local_data['pope']}")
    fp = benchmark_fingerprint(full)
    assert fp == benchmark_fingerprint(dict(full))  # stable
    assert ":split=test:n=20:" in fp and ":yaml=" in fp and fp.startswith("lmms_eval-")
    others = {
        "subset": bcfg("pope", f"benchmark.dataset_path={local_data['pope12']}"),
        "limit": bcfg("pope", f"benchmark.dataset_path={local_data['pope']}", "benchmark.limit=10"),
    }
    # the same rows saved again are another datasets fingerprint: never mistaken for the first copy
    import datasets

    datasets.load_from_disk(str(local_data["pope"])).save_to_disk(str(tmp_path / "resaved"))
    others["resaved"] = bcfg("pope", f"benchmark.dataset_path={tmp_path / 'resaved'}")
    fps = {k: benchmark_fingerprint(b) for k, b in others.items()}
    assert len({fp, *fps.values()}) == 4
    assert ":n=12:" in fps["subset"] and fps["limit"].endswith(":limit=10")
    td = task_data.resolve(full)  # the digest covers the generated YAML and pope's (included) YAML and utils.py
    assert td.info["task_yaml_digest"] == task_data.yaml_digest(Path(td.include_paths[0]) / f"{td.task}.yaml")
    names = [p.name for p in task_data._task_files(Path(td.include_paths[0]) / f"{td.task}.yaml")]
    assert names == [f"{td.task}.yaml", "pope.yaml", "utils.py"]


def test_synthvqa_records_keep_their_run_ids():
    """SynthVQA's fingerprint is unchanged, so every committed record's run id is still its config's."""
    recs = [json.loads(p.read_text()) for p in sorted((ROOT / "results" / "runs").glob("*/record.json"))]
    recs = [r for r in recs if r.get("benchmark") == "synthvqa" and r.get("config")]
    assert recs, "no committed SynthVQA records"
    for r in recs[:40]:
        assert benchmark_fingerprint(r["config"]["benchmark"]) == "synthvqa-gen1" == r["provenance"]["benchmark_fingerprint"]
        fps = {"model": r["provenance"]["model_fingerprint"], "benchmark": "synthvqa-gen1"}
        assert run_id(r["config"], fps) == r["run_id"]


def test_mme_limit_keeps_pairs(local_data):
    with pytest.raises(ConfigError, match="multiple of 2"):
        task_data.resolve(bcfg("mme", f"benchmark.dataset_path={local_data['mme']}", "benchmark.limit=5"))
    assert task_data.resolve(bcfg("mme", f"benchmark.dataset_path={local_data['mme']}", "benchmark.limit=6")).info["n_items"] == 20


# ----------------------------------------------------------------------------- availability
def test_missing_or_wrong_local_copies_are_config_errors(local_data, tmp_path):
    import datasets

    with pytest.raises(ConfigError, match=r"benchmark.dataset_path '.*nope' does not exist.*save_to_disk"):
        task_data.resolve(bcfg("pope", f"benchmark.dataset_path={tmp_path / 'nope'}"))
    single = tmp_path / "single"
    datasets.load_from_disk(str(local_data["pope"]))["test"].save_to_disk(str(single))
    with pytest.raises(ConfigError, match=r"single datasets.Dataset.*DatasetDict\(\{'test': dataset\}\)"):
        task_data.resolve(bcfg("pope", f"benchmark.dataset_path={single}"))
    wrong = tmp_path / "wrong_split"
    datasets.DatasetDict({"validation": datasets.load_from_disk(str(local_data["pope"]))["test"]}).save_to_disk(str(wrong))
    with pytest.raises(ConfigError, match=r"has the splits \['validation'\], but the task evaluates the 'test' split"):
        task_data.resolve(bcfg("pope", f"benchmark.dataset_path={wrong}"))
    with pytest.raises(ConfigError, match="synthvqa is generated by the harness"):
        task_data.resolve({**bcfg("synthvqa"), "dataset_path": str(local_data["pope"])})


def _offline_python(code: str, cache: Path, args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter with the hub offline (datasets reads HF_HUB_OFFLINE at import)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(cache), "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def _hand_built_hub_cache(cache: Path, src: Path) -> None:
    """A copy of ``src`` where datasets keeps lmms-lab-encoder/POPE after a download (the issue's
    20-item POPE "reached through a hand-built datasets cache")."""
    import datasets

    parquet = cache.parent / f"{cache.name}.parquet"
    datasets.load_from_disk(str(src))["test"].to_parquet(str(parquet))
    b = datasets.load_dataset_builder("parquet", data_files={"test": str(parquet)}, cache_dir=str(cache.parent / f"{cache.name}-build"))
    b.download_and_prepare()
    built = Path(b.cache_dir)
    dst = cache / "lmms-lab-encoder___pope" / "default" / "0.0.0" / built.name
    dst.mkdir(parents=True)
    info = json.loads((built / "dataset_info.json").read_text())
    info.update(config_name="default", builder_name="pope", dataset_name="pope")
    (dst / "dataset_info.json").write_text(json.dumps(info))
    (built / "parquet-test.arrow").rename(dst / "pope-test.arrow")


@pytest.mark.slow
def test_hub_cache_copies_are_told_apart_and_a_missing_one_is_a_config_error(local_data, tmp_path):
    """Offline, lmms-lab-encoder/POPE is read from the HF cache: its revision and size enter the run id,
    so a partial cache never takes the full benchmark's run id; an empty cache is a ConfigError."""
    _hand_built_hub_cache(tmp_path / "c20", local_data["pope"])
    _hand_built_hub_cache(tmp_path / "c12", local_data["pope12"])
    code = """
        import json, os, sys
        from bench.build import compose_config
        from bench import task_data
        from bench.errors import ConfigError
        out = {}
        for name in sys.argv[1:]:
            os.environ["LMMS_EVAL_DATASETS_CACHE"] = name  # the datasets cache lmms-eval (and task_data) read
            from lmms_eval.api.task import _resolve_hf_datasets_cache_dir
            _resolve_hf_datasets_cache_dir.cache_clear()  # lmms-eval resolves it once per process
            task_data._resolve.cache_clear()
            try:
                td = task_data.resolve(compose_config(["benchmark=pope"])["benchmark"])
                out[os.path.basename(name)] = {"fp": td.fingerprint, "info": td.info}
            except ConfigError as e:
                out[os.path.basename(name)] = {"error": str(e)}
        print(json.dumps(out))
    """
    (tmp_path / "empty").mkdir()
    r = _offline_python(code, tmp_path / "empty", args=[str(tmp_path / n) for n in ("c20", "c12", "empty")])
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["c20"]["info"]["origin"] == "hub" and out["c20"]["info"]["n_items"] == 20 and out["c12"]["info"]["n_items"] == 12
    assert out["c20"]["info"]["revision"] and out["c20"]["fp"] != out["c12"]["fp"]
    assert out["c20"]["info"]["task"] == "pope"  # the task's own data: the built-in task runs unchanged
    err = out["empty"]["error"]
    assert "lmms-lab-encoder/POPE" in err and "HF_HUB_OFFLINE" in err and "benchmark.dataset_path" in err


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing_path", "hub_unreachable"])
def test_cli_exits_2_naming_the_dataset_and_writes_nothing(case, tmp_path):
    results = tmp_path / "results"
    args = ["run", "benchmark=pope", f"results_dir={results}", "logger=none"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "empty-cache")}
    if case == "missing_path":
        args.append(f"benchmark.dataset_path={tmp_path / 'no-such-copy'}")
    r = subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    msg = r.stdout + r.stderr
    assert "benchmark.dataset_path" in msg and "Traceback" not in msg
    assert ("no-such-copy" in msg) if case == "missing_path" else ("lmms-lab-encoder/POPE" in msg)
    assert not results.exists()  # no record, no failed record, no leaderboard


# ----------------------------------------------------------------------------- leaderboard
def test_leaderboard_shows_data_origin_and_size_and_keeps_other_data_apart():
    from bench.aggregate import leaderboard

    def rec(rid, identity, origin, n, score, when):
        return {
            "status": "completed", "run_id": rid, "model": "m", "method": "none", "ratio": 0.0, "benchmark": "pope", "primary_metric": "pope_f1_score",
            "metrics": {"pope_f1_score": {"value": score, "higher_is_better": True}}, "efficiency": {}, "accuracy_measured": True, "limit": None,
            "n_samples": n, "finished_at": when, "data": {"origin": origin, "n_items": n, "identity": identity},
        }  # fmt: skip

    df = leaderboard([rec("a", "hub:x@1:split=test:n=9000", "hub", 9000, 0.85, "2026-01-01"), rec("b", "local:d-1:split=test:n=20", "local", 20, 1.0, "2026-02-01")])
    assert len(df) == 2  # the newer 20-item local copy does not replace the full benchmark's row
    assert sorted(zip(df["data"], df["data_items"])) == [("hub", 9000), ("local", 20)]
    old = {"status": "completed", "run_id": "c", "model": "m", "method": "none", "ratio": 0.0, "benchmark": "synthvqa", "primary_metric": "exact_match",
           "metrics": {"exact_match": {"value": 0.9}}, "efficiency": {}, "limit": None, "n_samples": 1000, "provenance": {"benchmark_fingerprint": "synthvqa-gen1"}}  # fmt: skip
    row = leaderboard([old]).iloc[0]
    assert row["data"] == "generated" and row["data_items"] == 1000
