"""Every input is checked before any model work (issue 28): bad input exits with code 2 and a one-paragraph
message, no traceback, and writes nothing — neither under results_dir nor in the working directory
(no multirun/ or wandb/ directory)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# spawns the CLI once per case: part of `make test`, not of the fast `make check` tier
pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "bench" / "assets" / "tiny-llava-synth"


def bench(args: list[str], cwd: Path, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update({"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(extra_env or {})})
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()} if d.exists() else {}


def _pickled(tmp: Path) -> Path:
    d = tmp / "pickled model"
    shutil.copytree(TINY, d)
    (d / "model.safetensors").unlink()
    # a pickle that would run code if unpickled: it must be refused before anything loads it
    (d / "pytorch_model.bin").write_bytes(b"cos\nsystem\n(S'touch " + str(tmp / "PWNED").encode() + b"'\ntR.")
    return d


def _damaged(tmp: Path) -> Path:
    d = tmp / "damaged"
    shutil.copytree(TINY, d)
    f = d / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.seek(f.stat().st_size // 2)
        fh.write(b"\x00" * 4096)
    return d


def _file(tmp: Path) -> Path:
    f = tmp / "a-file"
    f.write_text("not a directory")
    return f


# (case id, overrides: a list, or a function of tmp_path returning one, expected text in the message)
CASES = [
    # types and values
    ("seed-text", ["seed=abc"], "seed must be an integer"),
    ("seed-float", ["seed=1.5"], "seed must be an integer"),
    ("tome-r-text", ["method=tome", "ratio=0.5", "method.r=abc"], "method.r='abc': tome expects"),
    ("tome-prop-attn-int", ["method=tome", "ratio=0.5", "method.prop_attn=3"], "method.prop_attn=3"),
    ("overwrite-text", ["overwrite=maybe"], "overwrite must be true or false"),
    ("verify-text", ["verify=sometimes"], "verify must be true or false"),
    ("device", ["device=tpu"], "device must be auto, cpu, cuda"),
    ("download-text", ["model.download=yes"], "model.download must be true or false"),
    ("limit-zero", ["benchmark.limit=0"], "benchmark.limit must be a positive integer"),
    ("limit-text", ["benchmark.limit=ten"], "benchmark.limit must be a positive integer"),
    ("batch-zero", ["benchmark.batch_size=0"], "benchmark.batch_size must be a positive integer or auto"),
    ("repeats-zero", ["measure.repeats=0"], "measure.repeats must be an integer >= 1"),
    ("warmup-negative", ["measure.warmup=-1"], "measure.warmup must be an integer >= 0"),
    ("measure-batch-zero", ["measure.batch_size=0"], "measure.batch_size must be an integer >= 1"),
    ("measure-accuracy-text", ["measure.accuracy=maybe"], "measure.accuracy must be true or false"),
    ("sha256-not-a-map", ["model.sha256=abc"], "model.sha256 must be a mapping"),
    # unknown keys and '+'
    ("unknown-top-key", ["foo=1"], "unknown key 'foo'"),
    ("unknown-nested-key", ["benchmark.limt=10"], "unknown key 'benchmark.limt' (did you mean 'benchmark.limit'?)"),
    ("unknown-method-key", ["method=tome", "ratio=0.5", "method.rr=3"], "did you mean 'method.r'?"),
    ("unknown-key-in-sweep", ["-m", "method=random,pool", "ratio=0.5", "method.sed=3"], "unknown key 'method.sed'"),
    ("plus-new-key", ["+foo=1"], "+foo: adds a key that nothing reads"),
    ("plus-typo", ["+benchmark.limt=10"], "did you mean 'benchmark.limit'?"),
    ("plus-existing-key", ["+ratio=0.5"], "+ratio: ratio already exists"),
    ("plus-slurm-typo", ["+slurm.timout_min=5"], "did you mean 'timeout_min'?"),
    ("plus-secret", ["+logger.api_key=PLANTED-SECRET-1234"], "+logger.api_key: adds a key that nothing reads"),
    # names and ratios
    ("unknown-method", ["method=nope"], "Valid methods:"),
    ("method-typo", ["method=divprun"], "did you mean 'divprune'?"),
    ("unknown-model", ["model=gpt5"], "Valid models:"),
    ("unknown-benchmark", ["benchmark=imagenet"], "Valid benchmarks:"),
    ("unknown-sweep-preset", ["+sweep=nope"], "Valid sweeps:"),
    ("ratio-one", ["ratio=1.0"], "ratio must be in [0, 1)"),
    ("ratio-negative", ["ratio=-0.1"], "ratio must be in [0, 1)"),
    ("ratio-text", ["ratio=abc"], "ratio must be a number"),
    ("none-with-ratio", ["method=none", "ratio=0.5"], "only runs at ratio=0"),
    ("sweep-one-bad-name", ["-m", "method=random,bogus", "ratio=0.5"], "bogus"),
    ("sweep-one-bad-value", ["ratio=0.5", "-m", "method=random,pool", "seed=x"], "seed must be an integer"),
    # code execution through _target_
    ("method-target", ["method._target_=tempfile.mkdtemp"], "not one of the registered method classes"),
    ("model-target", ["model._target_=os.system"], "not one of the model adapters in bench/models/"),
    ("other-target", ["+foo._target_=os.system"], "_target_ can only be set for method and model"),
    ("launcher-target", ["hydra.launcher._target_=os.system"], "_target_ can only be set for method and model"),
    # the attention backend
    ("attn-unknown", ["model.attn_implementation=magic"], "model.attn_implementation must be one of"),
    ("attn-flash-missing", ["model.attn_implementation=flash_attention_2"], "needs the flash_attn package"),
    # the results directory
    ("results-dir-is-file", lambda t: [f"results_dir={_file(t)}"], "is a file, not a directory"),
    ("results-dir-under-file", lambda t: [f"results_dir={_file(t) / 'sub'}"], "is a file, so no directory can be created"),
    ("results-dir-name-too-long", lambda t: [f"results_dir={t / ('x' * 300)}"], "longer than a file name may be"),
    # paths with spaces or non-ASCII letters are paths, not syntax errors
    ("source-with-space", lambda t: [f"model.source={t / 'no such model'}"], "no weights at"),
    ("source-non-ascii", lambda t: [f"model.source={t / 'modèle'}"], "no weights at"),
    # weights
    ("pickled-weights", lambda t: [f"model.source={_pickled(t)}", "model.sha256=null"], "pickled weights (pytorch_model.bin)"),
    ("pinned-weights-changed", lambda t: [f"model.source={_damaged(t)}"], "model.safetensors does not match its pinned sha256"),
    ("model-dtype", ["model.dtype=float8"], "model.dtype must be one of"),
    # data and launcher
    ("dataset-missing", ["benchmark=gqa"], "is not available"),
    ("slurm-without-cluster", ["-m", "hydra/launcher=slurm", "method=random", "ratio=0.5"], "hydra/launcher=slurm"),
]


@pytest.mark.parametrize("case,args,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, case, args, needle):
    if case == "attn-flash-missing" and __import__("importlib").util.find_spec("flash_attn"):
        pytest.skip("flash_attn is installed here")
    if case == "slurm-without-cluster" and shutil.which("sinfo") and subprocess.run(["sinfo"], capture_output=True).returncode == 0:
        pytest.skip("a Slurm controller answers here")
    work = tmp_path / "work"
    work.mkdir()
    args = args(tmp_path) if callable(args) else args
    before = _tree(tmp_path)
    explicit = any(a.startswith("results_dir=") for a in args)
    r = bench(["run", *args] + ([] if explicit else [f"results_dir={tmp_path / 'results'}"]), cwd=work)
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert needle in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    msg = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(msg) == 1, r.stderr[-3000:]  # one paragraph
    assert _tree(tmp_path) == before, "a bad input wrote or changed a file"
    assert not (tmp_path / "PWNED").exists()
    assert "PLANTED-SECRET-1234" not in "".join(p.read_text(errors="ignore") for p in tmp_path.rglob("*") if p.is_file())


def test_full_error_still_shows_the_traceback(tmp_path):
    r = bench(["run", "seed=abc", f"results_dir={tmp_path / 'results'}"], cwd=tmp_path, extra_env={"HYDRA_FULL_ERROR": "1"})
    assert r.returncode == 2 and "Traceback" in r.stderr and "seed must be an integer" in r.stderr
    assert not (tmp_path / "results").exists()


def test_a_file_path_with_a_space_runs(tmp_path):
    """A results_dir with a space and a non-ASCII letter is quoted for Hydra and used as given."""
    results = tmp_path / "my résults"
    r = bench(["run", "method=random", "ratio=0.9", "benchmark.limit=2", "measure.efficiency=false", "logger=none", f"results_dir={results}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert list(results.glob("runs/*/record.json"))
