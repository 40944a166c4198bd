"""W&B is an output only: runs and leaderboards are sent there, nothing is ever read back.

Every call is guarded: a W&B failure is logged and never fails a run or loses a record. Offline mode
(the default) writes ``<dir>/wandb/offline-run-*`` that ``wandb sync`` can upload later.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from bench.redaction import redact

log = logging.getLogger(__name__)
_SECRET_KEYS = ("api_key", "apikey", "key", "token", "password", "secret")


def _check_no_secrets(cfg: dict[str, Any]) -> None:
    for k in cfg:
        if k.lower() in _SECRET_KEYS:
            raise ValueError(f"logger.{k}: credentials never go into configs (they would be hashed, recorded and logged); use `wandb login` or WANDB_API_KEY")


def _flat(prefix: str, d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, (int, float, str, bool)) or v is None:
            out[f"{prefix}{k}"] = v
    return out


def _settings(logger_cfg: dict[str, Any]):
    """W&B's own console output off unless ``logger.verbose=true``: its banner, run history and summary
    (about 30 lines per run) would bury the run's result line; :func:`_one_line` says where the run went."""
    import wandb

    verbose = bool(logger_cfg.get("verbose", False))
    return wandb.Settings(silent=not verbose, quiet=not verbose)


def _one_line(run, logger_cfg: dict[str, Any], what: str) -> None:
    if logger_cfg.get("verbose", False):
        return
    d = Path(run.dir).parent
    if logger_cfg.get("mode", "offline") == "offline":
        print(f"[bench] W&B {what}: offline run {d} (`wandb sync {d}` uploads it; logger.verbose=true shows W&B's output)")
    else:
        print(f"[bench] W&B {what}: {getattr(run, 'url', None) or d}")


def log_run(record: dict[str, Any], logger_cfg: dict[str, Any]) -> str | None:
    """Log one run record (config, metrics, efficiency) as a W&B run; returns its directory.

    Prints one ``[bench] W&B ...`` line, W&B's own output only with ``logger.verbose=true``."""
    if not logger_cfg or logger_cfg.get("name") != "wandb" or logger_cfg.get("mode") == "disabled":
        return None
    try:
        _check_no_secrets(logger_cfg)
        import wandb

        d = Path(logger_cfg.get("dir") or ".")
        d.mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=logger_cfg.get("project"),
            entity=logger_cfg.get("entity"),
            mode=logger_cfg.get("mode", "offline"),
            dir=str(d),
            group=logger_cfg.get("group") or "single-runs",
            job_type="run",
            name=f"{record['model']}/{record['method']}/r{record['ratio']}/{record['benchmark']}",
            tags=list(logger_cfg.get("tags") or []),
            config=redact({k: v for k, v in record.get("config", {}).items() if k not in ("logger",)}),
            reinit="finish_previous",
            settings=_settings(logger_cfg),
        )
        summary = {"run_id": record["run_id"], "status": record["status"], "ratio": record["ratio"]}
        summary.update({f"metrics/{k}": v.get("value") for k, v in (record.get("metrics") or {}).items()})
        summary.update(_flat("efficiency/", record.get("efficiency") or {}))
        if record.get("error"):
            summary["error"] = record["error"]
        run.summary.update(summary)
        run.log({k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        path = run.dir
        run.finish()
        _one_line(run, logger_cfg, "run")
        return str(Path(path).parent)
    except Exception:  # noqa: BLE001 - a sink must never break a run
        log.exception("W&B logging failed; the run record is unaffected")
        return None


def log_summary(tables: dict[str, Any], plots: list[Path], logger_cfg: dict[str, Any], group: str | None = None,
                figures: dict[str, Any] | None = None, images: dict[str, Path] | None = None) -> str | None:
    """Log the leaderboard (as W&B Tables), the Pareto plots, the site's interactive figures (``figures``:
    name -> plotly figure, as ``wandb.Plotly``) and the kept-token pictures (``images``: name -> PNG, as
    ``wandb.Image``) to one summary run."""
    try:
        _check_no_secrets(logger_cfg)
        import wandb

        d = Path(logger_cfg.get("dir") or ".")
        d.mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=logger_cfg.get("project", "tokenprune-bench"),
            entity=logger_cfg.get("entity"),
            mode=logger_cfg.get("mode", "offline"),
            dir=str(d),
            group=group or logger_cfg.get("group") or "leaderboard",
            job_type="aggregate",
            name="leaderboard",
            reinit="finish_previous",
            settings=_settings(logger_cfg),
        )
        payload = {}
        for name, df in tables.items():
            payload[f"table/{name}"] = wandb.Table(dataframe=df.astype(object).where(df.notna(), None))
        for p in plots:
            payload[f"plot/{p.stem}"] = wandb.Image(str(p))
        for name, fig in sorted((figures or {}).items()):
            payload[f"figure/{name}"] = wandb.Plotly(fig)
        for name, p in sorted((images or {}).items()):
            payload[f"kept/{name}"] = wandb.Image(str(p), caption=name)
        run.log(payload)
        path = run.dir
        run.finish()
        _one_line(run, logger_cfg, "summary")
        return str(Path(path).parent)
    except Exception:  # noqa: BLE001
        log.exception("W&B summary logging failed; the tables and plots on disk are unaffected")
        return None


def _key(item) -> str:
    # keys with "/" are stored as a nested key path
    return item.key or "/".join(item.nested_key)


def read_offline_run(run_dir: str | Path) -> dict[str, Any]:
    """Read an offline run back with wandb's own datastore reader (used by tests and for checks).

    Returns ``{"config": ..., "summary": ..., "history": [...], "record_types": [...]}``.
    """
    import json

    from wandb.proto import wandb_internal_pb2 as pb
    from wandb.sdk.internal import datastore

    files = sorted(Path(run_dir).glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file in {run_dir}")
    ds = datastore.DataStore()
    ds.open_for_scan(str(files[0]))
    out: dict[str, Any] = {"config": {}, "summary": {}, "history": [], "record_types": []}
    while True:
        data = ds.scan_data()
        if data is None:
            break
        rec = pb.Record()
        rec.ParseFromString(data)
        kind = rec.WhichOneof("record_type")
        out["record_types"].append(kind)
        if kind == "config":
            for item in rec.config.update:
                out["config"][_key(item)] = json.loads(item.value_json)
        elif kind == "summary":
            for item in rec.summary.update:
                out["summary"][_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            out["history"].append({_key(item): json.loads(item.value_json) for item in rec.history.item})
        elif kind == "run":
            out["group"] = rec.run.run_group
            out["name"] = rec.run.display_name
            for item in rec.run.config.update:
                out["config"][item.key] = json.loads(item.value_json)
    return out
