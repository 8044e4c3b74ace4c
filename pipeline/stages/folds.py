"""Folds stage: ``folds/<exp>.csv``, every train row in exactly one fold."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.config.paths import Paths
from pipeline.config.run_only import digest_section
from pipeline.config.schema import Config
from pipeline.core import artifacts, locks
from pipeline.core.errors import PipelineError
from pipeline.data.images import PATH
from pipeline.data.inspect import GIVEN_KEYS, inspect_competition
from pipeline.data.report import REPORT_MD, refresh_report
from pipeline.data.splits import assign_folds, describe_targets
from pipeline.data.tables import exclude_ids_file, read_test_table, read_train_table, task_spec


def run_folds(cfg: Config, force: bool = False) -> Path:
    """Write ``folds/<exp>.csv``; skipped when inputs and config are unchanged."""
    paths = Paths(cfg)
    out = paths.folds_csv
    inputs = [paths.train_csv] if paths.train_csv else []
    inputs += [exclude_ids_file(cfg)] if cfg.data.exclude_ids else []  # an edited exclude list redoes the folds
    listing = [] if paths.train_csv else sorted(str(p) for p in paths.train_dir.rglob("*") if p.is_file())
    digest = artifacts.fingerprint({"data": digest_section("data", cfg.data.__dict__), "folds": cfg.folds.__dict__,
                                    "images": listing}, inputs + [paths.sample_submission])
    if not force and artifacts.is_up_to_date([out], digest):
        print(f"folds: {out} is up to date (use --force to redo)")
        return out
    table = read_train_table(cfg)
    read_test_table(cfg)  # every later stage needs the test images: catch missing ones now
    spec = task_spec(cfg, table)
    spec.encode(table)  # every target must encode, whatever the strategy looks at
    fold = assign_folds(table, spec, cfg)
    artifacts.check_writable(out.parent)
    with locks.hold(out, f"folds file {out}", "is being written", wait=True):  # a second `make folds` waits
        if not force and artifacts.is_up_to_date([out], digest):  # written by the run it waited for
            print(f"folds: {out} is up to date (use --force to redo)")
            return out
        artifacts.remove_stale_temps(out.parent)
        columns = [cfg.data.id_column, *cfg.data.target_columns]
        if cfg.data.group_column:
            columns.append(cfg.data.group_column)
        frame = table[[c for c in columns if c != PATH]].copy()
        frame["fold"] = fold
        artifacts.write_csv(out, frame)
        artifacts.mark_done([out], digest)
    sizes = np.bincount(fold).tolist()
    grouped = ", near-duplicate images kept in one fold" if cfg.folds.group_near_duplicates else ""
    print(f"folds: wrote {out} ({len(frame)} rows, {cfg.folds.n_splits} folds of sizes {sizes}, "
          f"strategy {cfg.folds.strategy}{grouped}){describe_targets(spec)}")
    _refresh_data_report(cfg)
    return out


def _refresh_data_report(cfg: Config) -> None:
    """``init``'s ``runs/<exp>/data_report.md`` (+ ``.png``) redone for the data the folds were just
    made from (only where there is one: scanning every image is not free, and tests make many folds);
    a layout the report cannot read leaves the old report, with a note."""
    if not (Paths(cfg).exp_dir / REPORT_MD).exists():
        return
    given = {key: getattr(cfg.data, key) for key in GIVEN_KEYS}
    try:
        comp = inspect_competition(cfg.data.root, given)
    except PipelineError as exc:
        print(f"folds: the data report was not refreshed: {exc}")
        return
    findings, md, _ = refresh_report(comp, Paths(cfg).exp_dir, cfg.name)
    print(f"folds: data report {md}: " + ("; ".join(findings.summary()) or "nothing to act on"))
