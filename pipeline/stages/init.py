"""``python -m pipeline init DATA_DIR [--name N] [data.key=value ...]``: read a competition folder,
write ``configs/<name>.yaml`` (the inferred data keys, a metric, an image size and the photo
defaults, each commented) and the data report ``runs/<name>/data_report.md`` (+ ``.png``).

It never overwrites a config. What it cannot decide is a one-line error naming the columns or
files and the ``data.<key>=<value>`` word that decides it.
"""
from __future__ import annotations

import dataclasses
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from pipeline.config.draft import Draft, render
from pipeline.config.paths import Paths
from pipeline.config.schema import ID_PATTERN, config_from_dict
from pipeline.core import artifacts
from pipeline.core.errors import PipelineError
from pipeline.data.inspect import GROUP_HINTS, Competition, image_size, inspect_competition, parse_given
from pipeline.data.report import REPORT_MD, find, write_report
from pipeline.data.scan import scan_images


def config_name(data_dir: Path, name: str | None) -> str:
    """``--name``, or the folder's name made file-name safe (``My Comp!`` -> ``My-Comp``)."""
    if name is not None:
        if not ID_PATTERN.match(name):
            raise PipelineError(f"--name '{name}' is not a file-name-safe name; use letters, digits, '.', '_', '-'")
        return name
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(os.path.abspath(data_dir)).name).strip("-._")
    return safe or "competition"


def _draft(comp: Competition, name: str, root: str, size: int, size_why: str, source: str,
           near_groups: int = 0) -> Draft:
    why = {**comp.why, "backbones.image_size": size_why}
    if len(comp.group_columns) > 1:
        why["data.group_column"] += f" (also: {', '.join(comp.group_columns[1:])})"
    layout = comp.layout
    group = (comp.group_columns or [None])[0]
    use_groups = group is not None and any(h in group.lower() for h in GROUP_HINTS)
    if use_groups:
        why["data.group_column"] += "; its name says groups, so the folds keep each together"
    return Draft(name=name, root=root, task=comp.task, id_column=comp.id_column, target_columns=comp.target_columns,
                 metric=comp.metric, image_size=size, train_csv=layout.train_csv, train_dir=layout.train_dir,
                 test_dir=layout.test_dir, sample_submission=layout.sample_submission,
                 positive_class=comp.positive_class, group_column=group, use_groups=use_groups,
                 n_splits=comp.n_splits, submission_format=comp.submission_format, source=source,
                 why=why, near_groups=near_groups)


def _models(draft: Draft, cfg, size: int) -> str:
    """What trains: the preset's backbones (the measured size is in a comment), or the one backbone."""
    sizes = ", ".join(f"{b.slug} {b.image_size} px" for b in cfg.backbones)
    return f"preset {draft.preset}: {sizes}; measured image size {size}" if draft.preset else sizes


def _write_new(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file, never replacing a file that appeared meanwhile."""
    exists = PipelineError(f"{path} exists: init never overwrites a config; delete it or pass --name")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}-", suffix=artifacts.TMP_SUFFIX)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        try:
            os.link(tmp, path)  # fails if the file exists: no window between a check and the write
        except FileExistsError:
            raise exists from None
        except OSError:  # a file system without hard links
            if path.exists():
                raise exists from None
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def run_init(data_dir: str | Path, name: str | None = None, given_words: list[str] | tuple = (),
             configs_dir: str | Path = "configs") -> Path:
    """Write ``configs/<name>.yaml`` and ``runs/<name>/data_report.{md,png}``; returns the config's path."""
    start = time.perf_counter()
    data_dir, given_name = Path(data_dir), name
    name = config_name(data_dir, name)
    path = Path(configs_dir) / f"{name}.yaml"
    if path.exists():
        raise PipelineError(f"{path} exists: init never overwrites a config; delete it or pass --name")
    comp = inspect_competition(data_dir, parse_given(given_words))
    scan = scan_images(sorted(set(comp.train_files) | set(comp.test_files)))
    train_scan = scan[scan["path"].isin(set(comp.train_files)) & scan["width"].notna()]
    size, size_why = image_size(np.minimum(train_scan["width"], train_scan["height"]).astype(float))
    source = " ".join(["python -m pipeline init", data_dir.as_posix(), *(["--name", name] if given_name else []),
                       *given_words])
    findings = find(comp, scan)
    draft = _draft(comp, name, data_dir.as_posix(), size, size_why, source, len(findings.near_train_groups))
    cfg = config_from_dict(yaml.safe_load(render(draft)))  # the loader's own validation, before anything is written
    report_dir = Paths(cfg).exp_dir
    text = render(dataclasses.replace(draft, report=(report_dir / REPORT_MD).as_posix()))  # one comment more
    md, png = write_report(comp, findings, report_dir, name, time.perf_counter() - start)
    _write_new(path, text)
    print(f"init: wrote {path} ({comp.task}; id {comp.id_column}; target {', '.join(comp.target_columns)}; "
          f"metric {comp.metric}; {_models(draft, cfg, size)}) and {md} (+ {png.name}) in "
          f"{time.perf_counter() - start:.1f} s")
    for line in findings.summary():
        print(f"init: report: {line}")
    if cfg.folds.group_near_duplicates:
        print(f"init: {len(findings.near_train_groups)} near-duplicate groups inside train: set "
              f"folds.group_near_duplicates: true, so that no fold splits one (an optimistic CV otherwise)")
    print(f"init: check the metric against the competition's evaluation page, then "
          f"make all CONFIG={path} BUDGET=30 (folds, train, ensemble, leaderboard in 30 minutes)")
    return path
