"""``python -m bench {run,list,aggregate}`` — a thin dispatcher.

``run`` is a Hydra app (any ``key=value`` override, ``-m`` for sweeps); the others are plain argparse.
Group names and ratios are checked before Hydra starts so that a typo exits with code 2 and a list of
valid names, and nothing is written under ``results/``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from bench.build import ModelCache
from bench.errors import BenchError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("model", "method", "benchmark", "measure", "logger", "sweep")

USAGE = """usage: python -m bench <command> [args]

commands:
  run [key=value ...] [-m]   run model x method x ratio x benchmark (Hydra overrides; -m sweeps comma lists)
                             e.g. python -m bench run method=random ratio=0.75
                                  python -m bench run -m method=random,pool ratio=0.5,0.75,0.9
                             verify=true: re-answer recorded runs and check every answer equals the
                             record (writes nothing; exit code 3 if any differs)
  list [models|methods|benchmarks|families]
                             what the config tree offers (families: which method runs on which family)
  aggregate [--results-dir DIR]
                             rebuild DIR/leaderboard.csv, tables and plots from the run records
  status [SWEEP_DIR] [sweep overrides]
                             done / failed / running / stale / refused / missing runs of a sweep
                             (e.g. +sweep=demo, or multirun/<date> to read a sweep's own overrides)

sweeps on Slurm:            python -m bench run -m +sweep=paper_table hydra/launcher=slurm
                             (partition/account/gpus in conf/local/default.yaml; scripts/sweep_slurm.sh)
"""


def choices(group: str) -> list[str]:
    if group == "method":  # the one registry of methods (checks each YAML against its module)
        from methods import registry

        return registry.names()
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def describe(group: str, name: str) -> str:
    """First comment line of a config file, for ``list``."""
    if group == "method":
        from methods import registry

        return registry.get(name).summary
    for line in (CONF_DIR / group / f"{name}.yaml").read_text().splitlines():
        if line.startswith("#") and not line.startswith("# @package"):
            return line.lstrip("# ").strip()
    return ""


def _split_values(value: str) -> list[str]:
    m = re.fullmatch(r"\s*(choice|glob)\((.*)\)\s*", value)
    if m:
        if m.group(1) == "glob":
            return []
        value = m.group(2)
    if value.startswith(("range(", "interval(", "[", "{", "${")):
        return []
    return [v.strip().strip("'\"") for v in value.split(",") if v.strip()]


def check_overrides(args: list[str]) -> None:
    """Exit 2 on unknown group names or out-of-range ratios in command-line overrides."""
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key.endswith("_target_"):  # anything else would call an arbitrary importable function
            from bench.validate import check_target

            try:
                for v in _split_values(value) or [value]:
                    check_target(key, v)
            except BenchError as e:
                _die(str(e))
        if key in GROUPS:
            from methods.registry import suggest

            valid = choices(key)
            for v in _split_values(value):
                if v not in valid:
                    _die(f"unknown {key} {v!r}{suggest(v, valid)}. Valid {key}s: {', '.join(valid)}")
        elif key == "ratio":
            for v in _split_values(value):
                try:
                    r = float(v)
                except ValueError:
                    _die(f"ratio must be a number in [0, 1) (the fraction of visual tokens removed), got {v!r}")
                if not 0.0 <= r < 1.0:
                    _die(f"ratio must be in [0, 1) (the fraction of visual tokens removed), got {v}")


def _die(msg: str, code: int = 2) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


@dataclass
class Session:
    """What one ``python -m bench run`` gathers over its runs (one, or a sweep's in this process)."""

    failures: list[str] = field(default_factory=list)  # runs that failed (each left a `failed` record)
    refused: list[str] = field(default_factory=list)  # combinations refused with a reason (nothing written)
    mismatches: list[str] = field(default_factory=list)  # verify=true: records not reproduced, one line each
    pending: set[str] = field(default_factory=set)  # results dirs whose leaderboard awaits one refresh
    models: ModelCache = field(default_factory=ModelCache)  # one loaded model, reused by the sweep's runs
    jobs: int = 0  # jobs of a local sweep (Hydra's combinations), for the progress line
    done: int = 0  # jobs of it finished (recorded, skipped, refused or failed)
    started: float = field(default_factory=time.time)

    def tick(self) -> None:
        """One local sweep job finished: print the sweep's progress with its ETA (tqdm's meter).

        The ETA extrapolates the mean time per job so far; already recorded runs are skipped in no time,
        so it only settles once real runs have finished."""
        if not self.jobs:
            return
        from tqdm import tqdm

        self.done += 1
        meter = tqdm.format_meter(self.done, self.jobs, time.time() - self.started, unit="run", prefix="[bench] sweep", ncols=100)
        print(meter, file=sys.stderr, flush=True)

    def add(self, result) -> None:
        """Take in a ``bench.runner.RunResult``."""
        if result.refresh_pending:
            self.pending.add(result.refresh_pending)
        if result.mismatch:
            self.mismatches.append(result.mismatch)

    def refresh_pending(self) -> None:
        """Rebuild the leaderboard of every results dir a local sweep wrote to (also after Ctrl-C)."""
        if not self.pending:
            return
        from bench.aggregate import refresh_leaderboard

        for results_dir in sorted(self.pending):
            refresh_leaderboard(results_dir)
            print(f"[bench] leaderboard refreshed: {Path(results_dir) / 'leaderboard.csv'}")
        self.pending.clear()


def _hydra_app(session: Session):
    import hydra
    from omegaconf import DictConfig, OmegaConf

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
    def app(cfg: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        from bench.claims import RunKilled
        from bench.runner import execute
        from bench.sweep import normalize_none

        resolved = OmegaConf.to_container(cfg, resolve=True)
        multirun = HydraConfig.get().mode == RunMode.MULTIRUN
        if multirun and normalize_none(resolved):
            print("[bench] method=none keeps every token: this sweep point is the ratio=0 run")
        if isinstance(resolved.get("logger"), dict) and not resolved["logger"].get("group"):
            # W&B groups a sweep's runs by its directory name (unique per submission)
            resolved["logger"]["group"] = Path(HydraConfig.get().sweep.dir).name if multirun else "single-runs"
        # under a cluster launcher every job is its own process: a failure must reach the launcher
        # (which reports it and fails the sweep); Hydra's basic launcher, the only one that runs its
        # jobs in this process, must carry on past a failed one
        remote = not str(HydraConfig.get().launcher.get("_target_", "")).endswith(".BasicLauncher")
        # a local sweep rebuilds the leaderboard (CSVs, tables, plots) once at its end, not per run
        defer = multirun and not remote
        try:
            result = execute(resolved, refresh=not defer, models=session.models)
            session.add(result)
            if remote and result.mismatch:
                # a cluster job reports through its own exit status: a record that did not reproduce fails it
                raise RuntimeError(f"verify: run {result.run_id} did not reproduce its record")
        except BenchError as e:
            if not multirun:
                _die(str(e), e.exit_code)
            # in a sweep, one impossible combination (e.g. a method the model cannot run) must
            # not stop the others; it is reported at the end and the exit code says so
            print(f"error: {e}", file=sys.stderr)
            if remote:
                raise
            session.refused.append(f"{resolved['model']['name']} / {resolved['method']['name']} ratio={resolved['ratio']} / {resolved['benchmark']['name']}: {e}")
        except RunKilled as e:
            # a BaseException inside the run (so no library swallows it); as an ordinary exception
            # here so that Hydra and submitit record the job as failed instead of losing it
            raise RuntimeError(str(e)) from e
        except Exception as e:  # noqa: BLE001
            if not multirun or remote:
                raise
            # a failed job leaves a `failed` record and must not stop the rest of the sweep
            traceback.print_exc()
            session.failures.append(f"{resolved['method']['name']} ratio={resolved['ratio']} on {resolved['benchmark']['name']}: {type(e).__name__}: {e}")
        finally:
            if defer:
                session.tick()

    return app


def cmd_run(args: list[str]) -> None:
    check_overrides(args)
    from bench.redaction import hide_secret_overrides
    from bench.validate import preflight, quote_paths

    # -m may stand anywhere on the command line
    if any(a in ("-m", "--multirun") for a in args):
        args = ["-m", *[a for a in args if a not in ("-m", "--multirun")]]
    args = hide_secret_overrides(quote_paths(args))
    try:
        preflight(args)  # every job of a sweep, before any of them starts: bad input writes nothing
    except BenchError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            traceback.print_exc()
        _die(str(e), e.exit_code)
    sys.argv = [sys.argv[0], *args]
    session = Session()
    if args and args[0] == "-m" and not any(a.replace(" ", "").startswith("hydra/launcher=") and "basic" not in a for a in args):
        from bench.sweep import sweep_overrides

        try:
            session.jobs = len(sweep_overrides(args))  # Hydra's jobs: none at several ratios counts each time
        except Exception:  # noqa: BLE001 - a progress line is not worth failing the sweep for
            session.jobs = 0
    try:
        _hydra_app(session)()
    finally:
        session.refresh_pending()
    if session.refused:
        print(f"[bench] {len(session.refused)} combination(s) refused (nothing written for them):", file=sys.stderr)
        for f in session.refused:
            print(f"  - {f}", file=sys.stderr)
    if session.mismatches:
        print(f"[bench] {len(session.mismatches)} record(s) not reproduced (verify=true; nothing was changed):", file=sys.stderr)
        for f in session.mismatches:
            print(f"  - {f}", file=sys.stderr)
    if session.failures:
        print(f"[bench] {len(session.failures)} run(s) failed:", file=sys.stderr)
        for f in session.failures:
            print(f"  - {f}", file=sys.stderr)
        sys.exit(1)
    if session.mismatches:  # a record that does not reproduce outweighs refused combinations
        sys.exit(3)
    if session.refused:
        sys.exit(2)


def cmd_list(args: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m bench list", description="List models, methods and benchmarks from the config tree.")
    p.add_argument("what", nargs="?", choices=["models", "methods", "benchmarks", "families"], help="only this group")
    ns = p.parse_args(args)
    if ns.what == "families":
        from bench.families import markdown_table

        print(markdown_table())
        return
    groups = {"models": "model", "methods": "method", "benchmarks": "benchmark"}
    for title, group in groups.items():
        if ns.what and ns.what != title:
            continue
        print(f"{title}:")
        for name in choices(group):
            print(f"  {name:<20} {describe(group, name)}")


def cmd_status(args: list[str]) -> None:
    if any(a in ("-h", "--help") for a in args):
        print("usage: python -m bench status [SWEEP_DIR] [sweep overrides ...]\n\n"
              "Expands the sweep exactly as `python -m bench run -m <overrides>` would (presets: +sweep=demo,\n"
              "+sweep=synth_curve, +sweep=paper_table) and reports each run: completed / failed / running /\n"
              "killed (a running marker whose job is gone) / stale (a claim the next run takes over) /\n"
              "refused (run would reject the combination with exit code 2) / missing.\n\n"
              "SWEEP_DIR: a sweep's multirun directory (multirun/<date>, or hydra.sweep.dir): its own overrides\n"
              "are read from the multirun.yaml Hydra wrote there; overrides after it are applied on top.")
        return
    if args and "=" not in args[0] and not args[0].startswith("-"):
        from bench.status import sweep_dir_overrides

        found = sweep_dir_overrides(args[0])
        if found is None:
            _die(f"{args[0]} is not a sweep directory (no multirun.yaml or */.hydra/overrides.yaml in it); "
                 f"pass the sweep's overrides instead, e.g. python -m bench status +sweep=demo")
        print(f"[bench] sweep overrides from {args[0]}: {' '.join(found) or '(none)'}")
        args = [*found, *args[1:]]
    check_overrides(args)
    from bench.validate import quote_paths

    args = quote_paths(args)
    from bench.status import status

    st = status(args)
    width = max([len(r["method"]) for r in st["rows"]] + [6])
    for r in st["rows"]:
        err = f"  {r['error']}" if r["error"] and r["status"] in ("failed", "killed", "stale", "refused") else ""
        print(f"  {r['status']:<9} {r['run_id']}  {r['model']:<16} {r['method']:<{width}} ratio={r['ratio']:<8} {r['benchmark']}{err}")
    c = st["counts"]
    done = c.get("completed", 0)
    failed = c.get("failed", 0) + c.get("killed", 0) + c.get("corrupt", 0)
    extra = "".join(f", {c[k]} {label}" for k, label in (("stale", "stale claim(s)"), ("refused", "refused")) if c.get(k))
    print(f"\n[bench] {st['total']} runs: {done} done, {failed} failed, {c.get('running', 0)} running, {c.get('missing', 0)} missing{extra}")
    if c.get("refused"):
        print("[bench] refused: `run` rejects these combinations with exit code 2 before any work; they will never have a record")
    if c.get("stale"):
        print("[bench] stale claims: their jobs are gone; re-running the sweep takes them over")


def cmd_aggregate(args: list[str]) -> None:
    from bench.aggregate import aggregate

    p = argparse.ArgumentParser(prog="python -m bench aggregate", description="Rebuild the leaderboard from run records.")
    p.add_argument("--results-dir", default="results", help="directory holding runs/ (default: results)")
    p.add_argument("--wandb", choices=["offline", "online"], help="also log the leaderboard and plots to a W&B summary run")
    p.add_argument("--wandb-dir", default=".", help="W&B writes <dir>/wandb/ (default: .)")
    p.add_argument("--wandb-group", default=None, help="W&B group of the summary run (e.g. the sweep's name)")
    p.add_argument("--no-kept", action="store_true", help="leave the kept-token pictures out of the site (they run the embedded model)")
    ns = p.parse_args(args)
    if not (Path(ns.results_dir) / "runs").is_dir():
        _die(f"no run records under {ns.results_dir}/runs (run `python -m bench run` first)")
    wb = {"name": "wandb", "mode": ns.wandb, "project": "tokenprune-bench", "dir": ns.wandb_dir, "group": ns.wandb_group} if ns.wandb else None
    aggregate(ns.results_dir, wandb=wb, kept=not ns.no_kept)


COMMANDS = {"run": cmd_run, "list": cmd_list, "ls": cmd_list, "aggregate": cmd_aggregate, "status": cmd_status}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        _die(f"unknown command {cmd!r}\n{USAGE}")
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    from bench.redaction import install_log_filter

    install_log_filter()
    try:
        COMMANDS[cmd](rest)
    except BenchError as e:
        _die(str(e), e.exit_code)
