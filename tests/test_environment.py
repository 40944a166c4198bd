"""The locked environment: the installed distributions are exactly the lock's, and records name them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench import environment

IN_MAKE_VENV = any(Path(sys.prefix).glob(".installed-*"))  # the stamp `make install` leaves in its venv


def test_read_lock_parses_pins_with_hashes_and_markers(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text(
        "# comment\n"
        "Foo_Bar==1.2.3 \\\n    --hash=sha256:abc\n    # via x\n"
        "baz==0.1 ; platform_machine == 'x86_64' \\\n    --hash=sha256:def\n"
    )
    assert environment.read_lock(lock) == {"foo-bar": "1.2.3", "baz": "0.1"}


def test_compare_lists_each_difference():
    got = environment.compare({"a": "1", "b": "2", "pip": "1"}, {"a": "1", "b": "3", "c": "4", "pip": "2"})
    assert got == ["b: 2 -> 3", "c: absent -> 4"]


def test_digest_is_order_free():
    assert environment.digest({"a": "1", "b": "2"}) == environment.digest({"b": "2", "a": "1"})
    assert environment.digest({"a": "1"}) != environment.digest({"a": "2"})


def test_locks_exist_for_every_supported_machine_and_pin_everything():
    for arch in ("x86_64", "aarch64"):
        path = environment.lock_path(arch)
        text = path.read_text()
        pins = environment.read_lock(path)
        assert {"torch", "transformers", "lmms-eval", "filelock", "hydra-core", "setuptools"} <= set(pins), arch
        # every requirement line is an exact pin with at least one hash
        reqs = [ln for ln in text.splitlines() if ln and not ln.startswith((" ", "#"))]
        assert len(reqs) == len(pins)
        assert text.count("--hash=sha256:") >= len(pins)
        assert int(pins["filelock"].split(".")[0]) < 4  # lmms-eval 0.7 imports filelock._api


@pytest.mark.skipif(not IN_MAKE_VENV, reason="not the venv `make install` built from the lock")
def test_installed_environment_is_the_lock():
    lock = environment.read_lock(environment.lock_path())
    diff = environment.compare(lock, environment.installed())
    assert not diff, "the installed environment differs from the lock (run `make install`):\n" + "\n".join(diff)


@pytest.mark.skipif(not IN_MAKE_VENV, reason="not the venv `make install` built from the lock")
def test_pip_check_is_clean():
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_summary_names_lock_and_distributions():
    s = environment.summary()
    assert s["env_digest"] == environment.digest(s["distributions"])
    assert "torch" in s["distributions"] and "tokenprune-bench" not in s["distributions"]
    assert s["lock_digest"] is None or len(s["lock_digest"]) == 16


def test_git_dirty_looks_only_at_code_that_decides_results(tmp_path):
    """A rewritten results/ file or README is not 'dirty'; an edited method or lock is."""
    from bench.provenance import git_state

    def git(*a):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *a], cwd=tmp_path, check=True, capture_output=True)

    for f in ("methods/m.py", "results/leaderboard.csv", "README.md", "requirements/lock-x86_64.txt"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("a\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "init")
    assert git_state(tmp_path)[1] is False
    (tmp_path / "results/leaderboard.csv").write_text("b\n")
    (tmp_path / "README.md").write_text("b\n")
    assert git_state(tmp_path)[1] is False
    (tmp_path / "methods/m.py").write_text("b\n")
    assert git_state(tmp_path)[1] is True
    git("checkout", "--", "methods")
    (tmp_path / "requirements/lock-x86_64.txt").write_text("b\n")
    assert git_state(tmp_path)[1] is True
