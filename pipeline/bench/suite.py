"""The suite bench: a newcomer's first submissions on several real competitions, against the probe anchor.

``make bench-suite`` (``python -m pipeline bench --sections suite [--sets a,b] [--recipes ...]
[--budget 10] [--data ../shared/devdata]``). For each set (a Kaggle-layout folder with a
``solution.csv`` beside the sample submission) and each recipe, in a fresh folder of its own
(``runs/bench/suite/<set>/<recipe>/``: its own configs/, folds/, runs/, submissions/), as separate
timed processes:

* ``anchor``: ``init`` (not timed), then :mod:`pipeline.bench.anchor`: frozen EfficientNet-Lite0/1/2
  at their pretrained sizes, a logistic regression each, the mean of the three;
* ``fast``: ``init`` then ``all preset=fast``, the written config unedited;
* ``budget``: ``init`` then ``all --budget <minutes>`` with the preset ``init`` wrote.

Wall times are whole processes (Python and torch start-up included), summed over the timed ones.
Each submission (the leaderboard's pick for the recipes) is scored against ``solution.csv`` on the
config's metric; the pick's CV and its honesty come from the leaderboard. The rows are appended
to ``benchmarks/suite.csv`` (:data:`COLUMNS`) and this run's table replaces the suite block of
BENCHMARKS.md.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

SETS = ("scenes", "trashnet", "steel", "signs")
RECIPES = ("anchor", "fast", "budget")
COLUMNS = ["set", "recipe", "test_score", "cv", "honesty", "wall_s", "date", "commit"]
SUITE_CSV = Path("benchmarks") / "suite.csv"


@dataclass(frozen=True)
class SuiteOptions:
    """What a suite run measures: the sets under ``data``, the recipes, the budget recipe's
    minutes, where the runs go, and extra ``key=value`` words for every ``all`` (tests shrink it)."""

    data: Path = Path("../shared/devdata")
    sets: tuple[str, ...] = SETS
    recipes: tuple[str, ...] = RECIPES
    budget_min: float = 10.0
    work_dir: Path = Path("runs/bench/suite")
    words: tuple[str, ...] = ()  # extra override words for `all` (a test's tiny backbones)
    anchor_args: tuple[str, ...] = ()  # extra arguments of the anchor (a test's tiny models)


def options_from_words(opts: SuiteOptions, data: str | None = None, sets: str | None = None,
                       recipes: str | None = None, budget_min: float | None = None) -> SuiteOptions:
    """``opts`` with the command line's ``--data``, ``--sets a,b``, ``--recipes``, ``--budget``."""
    import dataclasses

    def names(text: str | None) -> tuple[str, ...] | None:
        return None if not text else tuple(x.strip() for x in text.split(",") if x.strip())

    changes = {"data": Path(data) if data else None, "sets": names(sets), "recipes": names(recipes),
               "budget_min": budget_min}
    return dataclasses.replace(opts, **{k: v for k, v in changes.items() if v is not None})


def _commit() -> str:
    """HEAD's short hash, ``+dirty`` when the package or configs differ from it ("" outside git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "pipeline", "configs", "pyproject.toml"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return head + ("+dirty" if dirty else "")


def _timed(command: list[str], cwd: Path, log: Path) -> float:
    """Run ``command`` in ``cwd`` with its output appended to ``log``; its wall seconds. A failed
    command is an error naming the log."""
    from pipeline.core.errors import PipelineError

    start = time.perf_counter()
    with open(log, "a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        code = subprocess.run(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    if code != 0:
        raise PipelineError(f"suite: `{' '.join(command)}` failed (exit {code}) in {cwd}; see {log}")
    return seconds


def run_recipe(set_dir: Path, recipe: str, folder: Path, opts: SuiteOptions) -> dict:
    """One recipe on one set in a fresh ``folder``: its row (without date and commit)."""
    from pipeline.config.schema import load_config
    from pipeline.ensembles.scores import collect
    from pipeline.stages.submit import run_score

    set_dir, name = set_dir.resolve(), set_dir.name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    log = folder / "log.txt"
    python = [sys.executable, "-m"]
    init = [*python, "pipeline", "init", str(set_dir.resolve()), "--name", name]
    config = f"configs/{name}.yaml"
    if recipe == "anchor":
        _timed(init, folder, log)
        submission = f"submissions/{name}-anchor.csv"
        wall = _timed([*python, "pipeline.bench.anchor", "-c", config, "--out", submission, *opts.anchor_args],
                      folder, log)
    elif recipe in ("fast", "budget"):
        how = ["preset=fast"] if recipe == "fast" else ["--budget", f"{opts.budget_min:g}"]
        wall = _timed(init, folder, log) + _timed([*python, "pipeline", "all", "-c", config, *how, *opts.words],
                                                  folder, log)
        submission = None
    else:
        from pipeline.core.errors import PipelineError
        raise PipelineError(f"--recipes: unknown {recipe}; valid: {', '.join(RECIPES)}")
    with contextlib.chdir(folder), open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        cfg = load_config(config, list(opts.words) + (["preset=fast"] if recipe == "fast" else []))
        cv, honesty = float("nan"), "none: no folds"
        if submission is None:
            pick = collect(cfg)[0].iloc[0]
            submission, cv, honesty = pick["submission"], float(pick["score"]), str(pick["honesty"])
        test = run_score(cfg, submission, set_dir.resolve() / "solution.csv")
    return {"set": name, "recipe": recipe, "test_score": round(float(test), 4),
            "cv": round(cv, 4) if cv == cv else "", "honesty": honesty, "wall_s": round(wall, 1)}


def bench_suite(opts: SuiteOptions, csv_path: Path = SUITE_CSV) -> str:
    """Every recipe on every set; each row appended to ``csv_path`` as it is measured; Markdown of
    this run's table."""
    from pipeline.core.errors import PipelineError

    missing = [s for s in opts.sets if not (opts.data / s / "solution.csv").exists()]
    if missing:
        raise PipelineError(f"--sets: {', '.join(missing)} not found under {opts.data} (each needs the Kaggle layout "
                            f"and a solution.csv); pass --data or --sets")
    date, commit, rows = time.strftime("%Y-%m-%d"), _commit(), []
    for name in opts.sets:
        for recipe in opts.recipes:
            row = run_recipe(opts.data / name, recipe, opts.work_dir / name / recipe, opts)
            rows.append({**row, "date": date, "commit": commit})
            print(f"suite: {row}", flush=True)
            _append(csv_path, rows[-1])  # each row as it is measured: a killed suite keeps what it measured
    return suite_table(pd.DataFrame(rows, columns=COLUMNS), opts)


def _append(csv_path: Path, row: dict) -> None:
    """``row`` appended to the suite's CSV (written whole, atomically, with the rows before it)."""
    from pipeline.core import artifacts

    frame = pd.DataFrame([row], columns=COLUMNS).astype(str)
    if csv_path.exists():
        frame = pd.concat([pd.read_csv(csv_path, dtype=str, keep_default_na=False), frame])
    artifacts.write_csv(csv_path, frame)


def suite_table(frame: pd.DataFrame, opts: SuiteOptions) -> str:
    """Markdown: one row per set, each recipe's hidden test score and wall time side by side."""
    recipes = [r for r in opts.recipes if r in set(frame["recipe"])]
    head = "| set | " + " | ".join(f"{r} test | {r} s" for r in recipes) + " | " + \
        " | ".join(f"{r} CV (honesty)" for r in recipes if r != "anchor") + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(recipes) + len([r for r in recipes if r != "anchor"]))]
    for name, rows in frame.groupby("set", sort=False):
        by = {r.recipe: r for r in rows.itertuples()}
        cells = [f"{by[r].test_score:.4f} | {by[r].wall_s:.0f}" if r in by else "- | -" for r in recipes]
        cvs = [f"{by[r].cv:.4f} ({by[r].honesty})" if r in by and by[r].cv != "" else "-"
               for r in recipes if r != "anchor"]
        lines.append(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(cvs) + " |")
    commit = frame["commit"].iloc[0] if len(frame) else ""
    lines += ["", f"Hidden test: each submission scored against the set's solution.csv (the leaderboard's pick for "
              f"fast and budget); wall seconds of whole processes on this machine, measured one at a time "
              f"(`init` included for fast and budget, not for the anchor). budget: `all --budget "
              f"{opts.budget_min:g}`. Data: {opts.data}; commit {commit}; rows also in {SUITE_CSV}."]
    return "\n".join(lines)
