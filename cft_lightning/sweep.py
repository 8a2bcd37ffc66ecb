"""`cft sweep FILE`: run a W&B sweep file's grid here, one process per run, and table the ablation.

The file is in W&B's own sweep format, so online it runs unchanged with `wandb sweep FILE` + `wandb agent ID`:

    program: cft
    method: grid
    metric: {name: test/acc1, goal: maximize}
    parameters:
      model.lr: {values: [5.0e-7, 1.0e-6]}
    command:                    # a block list: in a flow list [...] YAML reads ${...} as a mapping
      - ${env}
      - ${program}
      - fit
      - --config
      - configs/vit_b_cft.yaml
      - --test_after_fit=true
      - ${args}

Offline, `cft sweep` expands the grid (`values` lists and fixed `value`s; `random` and `bayes` need W&B's
server), renders `command` the way the agent does (`${args}` = `--key=value` per parameter, `${program}` =
this Python's `cft`, `${env}` / `${interpreter}` as the agent's), and runs each combination as its own
process with `--trainer.default_root_dir=<out>/<run>`: so DDP relaunches stay correct and runs never share a
folder. W&B runs are grouped by sweep (`WANDB_RUN_GROUP`, `WANDB_NAME`, `WANDB_TAGS`, `WANDB_JOB_TYPE`);
without a W&B key they are offline (`wandb sync` uploads them).

Resumable: a run whose `run_summary.json` (written by `cft fit`/`cft test`) says every stage finished is
skipped; an unfinished run restarts from its `last*.ckpt` when there is one (`--ckpt_path`), from scratch
otherwise. At the end the ablation table (the varying parameters, the sweep's metric and the other final
metrics) goes to the terminal, `<out>/ablation.{md,csv}` and `<out>/sweep.json`, and, when the runs logged to
W&B, to a W&B summary run of the group; `<out>/ablation.png` plots the sweep's metric against the swept value
(`cft_lightning.sweep_figure`).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from cft_lightning._io import atomic_write
from cft_lightning._tool_cli import Tool
from cft_lightning.errors import CommandFailed, DataError
from cft_lightning.sweep_figure import ablation_plot, is_finite_number, short_value
from cft_lightning.tracking import ensure_wandb_mode, find_run_summary

__all__ = ["TOOL", "SweepRun", "expand_grid", "load_sweep", "main", "render_command", "run_sweep", "sweep_command"]

SweepRun = dict[str, Any]


def load_sweep(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The sweep file, checked: a grid over `values` lists and fixed `value`s, with a command."""
    try:
        spec = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise DataError(f"sweep file {path}: {exc}") from exc
    if not isinstance(spec, dict) or not isinstance(spec.get("parameters"), dict) or not spec["parameters"]:
        raise DataError(f"sweep file {path}: needs a 'parameters' mapping")
    if spec.get("method", "grid") != "grid":
        raise DataError(f"sweep file {path}: method {spec.get('method')!r} needs W&B's server (wandb sweep + wandb "
                        "agent); `cft sweep` runs grids")
    for name, param in spec["parameters"].items():
        if not isinstance(param, dict) or not ("values" in param or "value" in param):
            raise DataError(f"sweep file {path}: parameter {name!r} needs 'values' (a list) or 'value'; "
                            "distributions need W&B's server")
        if "values" in param and (not isinstance(param["values"], list) or not param["values"]):
            raise DataError(f"sweep file {path}: parameter {name!r}: 'values' must be a non-empty list")
    command = spec.get("command", ["${env}", "${interpreter}", "${program}", "${args}"])
    if not isinstance(command, list) or not any("${args" in str(c) for c in command):
        raise DataError(f"sweep file {path}: 'command' must be a list containing ${{args}}")
    return {**spec, "command": command}


def expand_grid(parameters: dict[str, Any]) -> list[dict[str, Any]]:
    """Every combination, in the file's order (the last parameter varies fastest)."""
    names = list(parameters)
    choices = [p["values"] if "values" in p else [p["value"]] for p in parameters.values()]
    return [dict(zip(names, combo)) for combo in itertools.product(*choices)]


def _value(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def render_command(command: list[str], program: str, params: dict[str, Any]) -> list[str]:
    """The agent's macros: ${args} (--k=v), ${args_no_equals} (--k v), ${program}, ${interpreter}, ${env}."""
    out: list[str] = []
    for token in command:
        token = str(token)
        if token == "${env}":
            continue  # the environment is passed to the process, not on its command line
        if token == "${interpreter}":
            out.append(sys.executable)
        elif token == "${program}":
            out += [sys.executable, "-m", "cft_lightning"] if program == "cft" else [program]
        elif token == "${args}":
            out += [f"--{k}={_value(v)}" for k, v in params.items()]
        elif token == "${args_no_equals}":
            out += [part for k, v in params.items() for part in (f"--{k}", _value(v))]
        elif "${" in token:
            raise DataError(f"sweep command macro {token!r} is not supported offline (use ${{args}})")
        else:
            out.append(token)
    return out


def run_name(index: int, params: dict[str, Any], varying: list[str]) -> str:
    """`007-lr=1e-06-relevance=GradCAM`: the index and the varying values, file-name safe."""
    parts = [f"{key.split('.')[-1]}={short_value(params[key])}" for key in varying]
    slug = re.sub(r"[^A-Za-z0-9=._+-]+", "_", "-".join(parts))[:80]
    return f"{index:03d}-{slug}" if slug else f"{index:03d}"


def _stages(command: list[str]) -> list[str]:
    """The stages a run's command must finish: fit (and test with --test_after_fit true), or test."""
    line = " ".join(command)
    if "fit" in command:
        after = re.search(r"--test_after_fit[= ](true|1|yes)\b", line, re.IGNORECASE)
        return ["fit", "test"] if after else ["fit"]
    return ["test"] if "test" in command else ["fit"]


def _summary(run_dir: Path) -> dict[str, Any]:
    """The run's `run_summary.json` (in its run folder under `run_dir`; the newest after a resume), or {}."""
    path = find_run_summary(run_dir)
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path is not None else {}
    except (OSError, ValueError):
        return {}


def _finished(run_dir: Path, command: list[str]) -> bool:
    summary = _summary(run_dir)
    return all(summary.get(s, {}).get("status") == "finished" for s in _stages(command))


def _die_with_parent() -> None:
    """In the run's process (Linux): SIGKILL it when the runner dies, so a killed sweep leaves no orphan run
    writing into a folder the rerun is about to use. Elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _last_checkpoint(run_dir: Path) -> str | None:
    found = sorted(run_dir.rglob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
    return str(found[-1]) if found else None


def run_sweep(path: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, dry_run: bool = False,
              max_runs: int | None = None, extra: list[str] | None = None) -> dict[str, Any]:
    """Run (or, with `dry_run`, list) every grid point; returns the sweep record written to `<out>/sweep.json`."""
    spec = load_sweep(path)
    name = spec.get("name") or Path(path).stem
    out_dir = Path(out) if out is not None else Path("runs") / "sweeps" / name
    grid = expand_grid(spec["parameters"])
    varying = [k for k, p in spec["parameters"].items() if len(p.get("values", [None])) > 1]
    runs: list[SweepRun] = []
    mode = ensure_wandb_mode()
    for i, params in enumerate(grid[:max_runs] if max_runs else grid):
        run = run_name(i, params, varying)
        run_dir = out_dir / run
        command = render_command(spec["command"], str(spec.get("program", "cft")), params) + list(extra or [])
        command.append(f"--trainer.default_root_dir={run_dir}")
        record: SweepRun = {"run": run, "params": params, "dir": str(run_dir), "command": command}
        runs.append(record)
        if dry_run:
            print(" ".join(command))
            continue
        if _finished(run_dir, command):
            record["status"] = "skipped (finished before)"
            print(f"cft sweep: {run}: finished before, skipped", flush=True)
            continue
        resume = _last_checkpoint(run_dir) if "fit" in command else None
        if resume:
            command.append(f"--ckpt_path={resume}")
        env = {**os.environ, "WANDB_RUN_GROUP": name, "WANDB_NAME": run, "WANDB_JOB_TYPE": "sweep",
               "WANDB_TAGS": name}
        if mode:
            env["WANDB_MODE"] = mode
        run_dir.mkdir(parents=True, exist_ok=True)
        print(f"cft sweep: {run} ({i + 1}/{len(grid)}){' resuming ' + resume if resume else ''}", flush=True)
        with open(run_dir / "sweep_run.log", "a", encoding="utf-8") as log:
            code = subprocess.call(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   preexec_fn=_die_with_parent)
        record["status"] = "finished" if code == 0 else f"failed (exit {code}; see {run_dir / 'sweep_run.log'})"
        if code != 0:
            print(f"cft sweep: {run} failed with exit code {code}; log: {run_dir / 'sweep_run.log'}", flush=True)
    if dry_run:
        return {"name": name, "runs": runs}
    table = ablation_table(runs, varying, spec.get("metric", {}).get("name"))
    record_all = {"name": name, "file": str(path), "metric": spec.get("metric"), "varying": varying, "runs": runs,
                  "table": table}
    write_ablation(out_dir, record_all)
    return record_all


def _metrics(run_dir: Path) -> dict[str, float]:
    summary = _summary(run_dir)
    merged: dict[str, float] = {}
    for stage in ("fit", "test"):
        for key, value in summary.get(stage, {}).get("metrics", {}).items():
            if isinstance(value, float):
                merged[key] = value
    return merged


def ablation_table(runs: list[SweepRun], varying: list[str], metric: str | None) -> list[dict[str, Any]]:
    """One row per run: its varying parameters, the sweep metric first, then val/test metrics."""
    rows = []
    for record in runs:
        metrics = _metrics(Path(record["dir"]))
        keep = {k: v for k, v in metrics.items() if k.startswith(("val/", "test/")) and not k.endswith("_step")}
        row: dict[str, Any] = {"run": record["run"], **{k: record["params"][k] for k in varying}}
        if metric:
            row[metric] = metrics.get(metric)
        row.update({k: v for k, v in sorted(keep.items()) if k != metric})
        row["status"] = record.get("status", "")
        rows.append(row)
    return rows


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(k for row in rows for k in row))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def write_ablation(out_dir: Path, record: dict[str, Any]) -> None:
    """`sweep.json`, `ablation.md`, `ablation.csv` and `ablation.png`; prints the table; logs it to W&B when the
    runs used a WandbLogger."""
    rows = record["table"]
    columns = _columns(rows)
    shown = [c for c in columns if c in ("run", "status") or c in record["varying"]
             or c == (record.get("metric") or {}).get("name") or c.startswith("test/") or c in ("val/acc1", "val/loss")]
    md = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    md += ["| " + " | ".join(_cell(row.get(c)) for c in shown) + " |" for row in rows]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("sweep.json", json.dumps(record, indent=2, default=str) + "\n"),
                       ("ablation.md", "\n".join(md) + "\n"), ("ablation.csv", buffer.getvalue())):
        atomic_write(out_dir / name, lambda fh, text=text: fh.write(text.encode("utf-8")))
    png = ablation_figure(rows, record["varying"], plot_metric(record), out_dir / "ablation.png", record["name"])
    print(f"\ncft sweep {record['name']}: {len(rows)} run(s)\n" + "\n".join(md))
    print(f"files: {out_dir / 'ablation.md'}, {out_dir / 'ablation.csv'}" + (f", {png}" if png else ""))
    _log_to_wandb(record, out_dir, png)


def plot_metric(record: dict[str, Any]) -> str | None:
    """The metric `ablation.png` draws: the sweep's own, else test/acc1, val/acc1 or the first test/ column that
    some run reported."""
    rows = record["table"]
    reported = [c for c in _columns(rows) if any(is_finite_number(row.get(c)) for row in rows)]
    named = (record.get("metric") or {}).get("name")
    fallback = [c for c in reported if c.startswith("test/") and "/ref_" not in c]  # not the Original's columns
    for choice in (named, "test/acc1", "val/acc1", *fallback):
        if choice in reported:
            return choice
    return None


def ablation_figure(rows: list[dict[str, Any]], varying: list[str], metric: str | None, path: Path,
                    title: str) -> Path | None:
    """Write `ablation_plot` as a PNG at `path`; None (and no stale picture left) when no run reported `metric`."""
    fig = ablation_plot(rows, varying, metric, title) if metric else None
    if fig is None:
        path.unlink(missing_ok=True)
        return None
    fig.savefig(path, dpi=120)
    return path


def _log_to_wandb(record: dict[str, Any], out_dir: Path, png: Path | None) -> None:
    used = set()
    for run in record["runs"]:
        summary = _summary(Path(run["dir"]))
        used.update(lg for stage in summary.values() for lg in stage.get("loggers", []))
    if "WandbLogger" not in used or os.environ.get("WANDB_MODE") == "disabled":
        return
    import wandb

    rows = record["table"]
    columns = _columns(rows)
    run = wandb.init(group=record["name"], job_type="sweep-summary", name=f"{record['name']}-ablation",
                     dir=str(out_dir), reinit="finish_previous")
    logged = {"ablation": wandb.Table(columns=columns, data=[[_cell(r.get(c)) for c in columns] for r in rows])}
    if png is not None:
        logged["ablation_figure"] = wandb.Image(str(png))
    run.log(logged)
    run.finish()


def sweep_command(file: str, out: str | None = None, dry_run: bool = False, max_runs: int | None = None,
                  run_args: list[str] | None = None) -> None:
    """Run a W&B sweep file's grid locally, one process per run, and print the ablation table. Options after the
    file (--key=value) go to every run.

    Args:
        file: sweep YAML (W&B format), e.g. configs/sweeps/table7_relevance.yaml
        out: output folder (null: runs/sweeps/<sweep name>)
        dry_run: print the commands, run nothing
        max_runs: only the first N grid points (null: all)
        run_args: options added to every run's command, e.g. [--trainer.max_epochs=1]; the command line's
            --key=value options are appended to it
    """
    record = run_sweep(file, out, dry_run, max_runs, run_args)
    failed = [r["run"] for r in record["runs"] if str(r.get("status", "")).startswith("failed")]
    if failed:
        raise CommandFailed(f"cft sweep: {len(failed)} of {len(record['runs'])} run(s) failed: {', '.join(failed)} "
                            "(logs: <run folder>/sweep_run.log)")


TOOL = Tool(sweep_command, prog="cft sweep", positional=True)


def main(argv: list[str] | None = None) -> None:
    """Entry point of `cft sweep`: the sweep's own options (or --config YAML), every other --key=value to the
    runs."""
    own, extra = TOOL.split(list(sys.argv[1:] if argv is None else argv))
    bad = [a for a in extra if not a.startswith("--")]
    if bad:
        raise DataError(f"cft sweep: unexpected argument(s) {bad}; pass extra run options as --key=value")
    TOOL([*own, *(f"--run_args+={a}" for a in extra)])
