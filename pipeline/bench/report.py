"""Benchmarks: the pipeline's cost against the bare model's, as ratios measured in one run.

Absolute speeds on shared machines are noise; a ratio of two loops timed back to back on the
same machine, model, batch and resolution is not. Each row prints the measured ratio and its
goal; the table (with the command and machine) is written to BENCHMARKS.md.

* train step: pipeline images/s / bare forward+backward images/s (synthetic uint8 batches,
  the pipeline's own normalisation, loss, optimizer groups, scheduler and stepper);
* inference with TTA: pipeline images/s x views / bare forward images/s;
* frozen phase, all folds on cached features / one bare forward pass over the same images, and
  the same phase through the model / with the cache;
* peak resident memory of a training process, and the image cache's size.

The rows through the real input path (JPEG files and a fold's own loaders: ``--sections input``,
also run by ``speed``), one fold timed step by step (``timeline``) and absolute GPU speeds
(``gpu``) are in :mod:`pipeline.bench.inputs`.
"""
from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pipeline.bench.measure import (
    CannotRun,
    bench_frozen_only,
    bench_frozen_phase,
    bench_inference,
    bench_train_step,
    machine,
    peak_memory_of_training,
)
from pipeline.config.schema import BackboneConfig, Config, dump_config
from pipeline.core import artifacts
from pipeline.data.cache import ImageCache
from pipeline.data.tables import read_train_table

SECTIONS = ("speed", "input", "cpu", "timeline", "tune", "lpft", "finetune", "frozen", "tta", "features", "unfreeze",
            "pairs", "lrs", "gpu", "ray", "labels", "presets", "suite")


def run_bench(cfg: Config, quick: bool = False, output: str = "BENCHMARKS.md",
              sections: tuple[str, ...] = SECTIONS, suite=None,
              settings: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """The speed table (always with ``--quick``, which runs only it), then the other sections asked
    for, each written into ``output`` as its own block (the other blocks are kept).

    ``settings``: keyword arguments per section for a smaller run than the one BENCHMARKS.md quotes,
    e.g. ``{"tune": {"trials": 2}, "frozen": {"seeds": (42,)}}`` (``speed``'s and ``input``'s
    sizes, the seeds, trials, folds or members of the others: see each section's function);
    tests/test_bench_sections.py runs every section so. A section that cannot run here (no GPU,
    no hidden test labels, no Ray) says why in one line and writes no block.
    """
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        from pipeline.core.errors import PipelineError
        raise PipelineError(f"--sections: unknown {', '.join(unknown)}; valid: {', '.join(SECTIONS)}")
    settings = settings or {}
    path = Path(output)
    if quick or "speed" in sections:
        path = bench_speed(cfg, quick, output, **settings.get("speed", {}))
    if quick:
        return path
    config = "" if cfg.name == "demo" else f"CONFIG=configs/{cfg.name}.yaml "
    bench_dir = Path(cfg.runs_dir) / "bench"
    from pipeline.bench import inputs as bench_input
    from pipeline.bench import photos as bench_photos
    from pipeline.bench import quality as bench_quality
    from pipeline.bench.ray_folds import bench_ray
    # name -> (title, measure(cfg, **settings) -> the block's Markdown body); in the order they run
    measures = {"input": ("Speed through the real input path",  # also run by speed: the same table through files
                          lambda c, **kw: _table(bench_input.input_rows(c, False, bench_dir, **kw))),
                "timeline": ("Where the time of one fold goes", _timeline),
                "gpu": ("GPU", lambda c, **kw: _table(bench_input.gpu_rows(c, bench_dir, **kw))),
                "tune": ("Tuned vs default learning rates", bench_quality.bench_tune),
                "lpft": ("LP-FT: linear probe before fine-tuning", bench_quality.bench_lpft),
                "finetune": ("Fine-tuning against the frozen head, and which weights to keep",
                             bench_quality.bench_finetune),
                "cpu": ("A CPU's layout and passes: channels_last and small inference passes against before",
                        bench_photos.cpu_layout),
                "frozen": ("A stronger frozen path: the probe on several views of each image, "
                           "and a centre-crop TTA view",
                           lambda c, **kw: bench_photos.run_recipes(c, "frozen", **kw)),
                "tta": ("A centre-crop TTA view: the configured views against the same plus zoom",
                        bench_photos.tta_zoom),
                "features": ("A feature ensemble: one probe over several backbones' frozen features",
                             bench_photos.feature_ensemble),
                "unfreeze": ("Unfreeze only where it pays: never, always, auto (fold 0 decides)",
                             lambda c, **kw: bench_photos.run_recipes(c, "unfreeze", **kw)),
                "pairs": ("Unfreeze only where it pays, on two-class sets cut from the photos: an easy pair and a "
                          "hard one", bench_photos.unfreeze_pairs),
                "lrs": ("The unfrozen LR: auto at the configured LR against auto screening 1e-4, 3e-4, 1e-3 first",
                        lambda c, **kw: bench_photos.run_recipes(c, "lrs", **{"seeds": (42,), **kw})),
                "ray": ("Folds as Ray tasks: a local 2-node cluster against one process", bench_ray),
                "labels": ("Likely label errors: 5% flipped labels, found by `label-issues` and excluded",
                           bench_photos.label_noise),
                "presets": ("Presets: fast, balanced, best, each a whole run (folds, train, ensemble, leaderboard)",
                            bench_photos.bench_presets)}
    if "suite" in sections:  # the newcomer's path on every development set, beside the probe anchor
        from pipeline.bench.suite import SuiteOptions, bench_suite
        body = bench_suite(suite or SuiteOptions())
        print(body)
        _write_section(path, "suite", f"## The suite: anchor, fast and budget on real competitions: "
                                      f"`make bench-suite` on {machine()}, {time.strftime('%Y-%m-%d')}\n\n{body}")
    for name, (title, measure) in measures.items():
        if name in sections or (name == "input" and "speed" in sections):
            try:
                body = measure(cfg, **settings.get(name, {}))
            except CannotRun as why:
                print(f"--sections {name}: {why}; nothing measured")
                continue
            print(body)
            _write_section(path, name, f"## {title}: `make bench {config}ARGS=\"--sections {name}\"` on {machine()}, "
                                       f"{time.strftime('%Y-%m-%d')}\n\n{body}")
    return path


QUICK_SPEED = {"model": "test_efficientnet", "size": 32, "batch": 16, "steps": 3, "repeats": 2, "epochs": 2}


def bench_speed(cfg: Config, quick: bool, output: str, *, model: str = "efficientnet_lite0", size: int = 128,
                batch: int = 32, steps: int = 6, repeats: int = 3, epochs: int = 5) -> Path:
    """The speed table (see the module docstring), written into ``output``.

    ``model`` at ``size`` px and ``batch``: the synthetic rows (``steps`` batches, best of ``repeats``);
    the frozen-phase rows run the first backbone at ``size`` px for ``epochs`` epochs. ``quick``:
    ``QUICK_SPEED`` and the tiny ``test_efficientnet`` for every row, whatever the arguments say."""
    if quick:
        model, size, batch, steps, repeats, epochs = QUICK_SPEED.values()
    cuda = torch.cuda.is_available()
    rows = []

    r = bench_train_step(cfg, model, size, batch, steps, repeats)
    rows.append(("train step, synthetic batches: pipeline / bare fwd+bwd", r["pipeline_img_s"] / r["bare_img_s"],
                 ">= 0.85" if cuda else ">= 0.9", f"{r['pipeline_img_s']:.0f} vs {r['bare_img_s']:.0f} img/s",
                 f"{model} {size}px batch {batch}"))
    gc.collect()
    views = ["identity", "hflip"]
    r = bench_inference(cfg, model, size, batch, steps, repeats, views)
    rows.append(("inference with TTA, synthetic batches: pipeline x views / bare fwd",
                 r["pipeline_img_s"] * r["views"] / r["bare_img_s"],
                 ">= 0.9", f"{r['pipeline_img_s']:.0f} img/s x {r['views']} views vs {r['bare_img_s']:.0f} img/s",
                 f"{model} {size}px batch {batch}"))
    gc.collect()

    bench_dir = Path(cfg.runs_dir) / "bench"
    tiny = BackboneConfig(name="test_efficientnet", weights="none", image_size=32)
    small = cfg.replace(name="bench", backbones=[tiny if quick else cfg.backbones[0]])
    r = bench_frozen_phase(small, epochs, image_size=None if quick else size)
    setting = (f"{r['folds']} folds x {r['epochs']} epochs, {r['images']} images, "
               f"{small.backbones[0].name} {r['size']}px")
    rows.append(("frozen phase, all folds, cached / one bare fwd pass", r["cached_s"] / r["bare_forward_s"], "<= 1.2",
                 f"{r['cached_s']:.2f} s vs {r['bare_forward_s']:.2f} s", setting))
    rows.append(("frozen phase: through the model / cached", r["through_model_s"] / r["cached_s"], ">= 10",
                 f"{r['through_model_s']:.1f} s vs {r['cached_s']:.2f} s", "same folds and epochs"))
    if not quick:  # the demo's own tiny images: the worst case for this ratio (see bench_frozen_phase)
        r = bench_frozen_phase(small, epochs, through_model=False)
        rows.append(("frozen phase, all folds, cached / one bare fwd pass", r["cached_s"] / r["bare_forward_s"],
                     "<= 1.2", f"{r['cached_s']:.2f} s vs {r['bare_forward_s']:.2f} s",
                     f"same at the demo's {r['size']}px: the head's {r['folds'] * r['epochs']} epochs of steps are a "
                     f"fixed cost that weighs more against a tiny forward pass"))

    r = bench_frozen_only(small, image_size=None if quick else size)
    rows.append(("frozen-only train stage (probe, OOF, test, all folds) / one bare fwd pass per view",
                 r["stage_s"] / r["bare_forward_s"], "<= 1.3", f"{r['stage_s']:.2f} s vs {r['bare_forward_s']:.2f} s",
                 f"{r['folds']} folds, {r['images']} train+test images x {r['views']} views, "
                 f"{small.backbones[0].name} {r['size']}px"))

    config_path = bench_dir / "bench.yaml"
    one_epoch = small.replace(train=dataclasses.replace(small.train,
                                                        frozen=dataclasses.replace(small.train.frozen, epochs=1),
                                                        unfrozen=dataclasses.replace(small.train.unfrozen, epochs=1)),
                              runs_dir=str(bench_dir / "runs"))
    artifacts.write_text(config_path, dump_config(one_epoch))
    rss, imports = peak_memory_of_training(config_path)
    rows.append(("peak RSS of a training process (1 fold, 1+1 epochs)", rss, "-",
                 f"{rss:.0f} MiB, of which {imports:.0f} MiB after importing torch, timm and the rest",
                 f"{one_epoch.backbones[0].name} {one_epoch.backbones[0].image_size or 224}px"))
    n_images = len(read_train_table(cfg, check_readable=False))
    img_size = small.backbones[0].image_size or 224
    cache_mib = ImageCache.bytes_needed(n_images, img_size) / 2**20
    rows.append(("image cache size (train images)", cache_mib, "-", f"{cache_mib:.1f} MiB",
                 f"{n_images} images at {img_size}px"))
    demo = Path(cfg.runs_dir) / "demo_wall_time.json"
    if demo.exists():
        seconds = artifacts.read_json(demo)["seconds"]
        rows.append(("wall time of `make demo`", seconds, "-", f"{seconds / 60:.1f} min", "end to end, this machine"))
    return _report(rows, output, quick)


def _table(rows) -> str:
    """The rows as a Markdown table, with a "met" column for goals ``>= x``/``<= x``."""
    header = "| benchmark | measured | goal | met | figures | setting |\n|---|---|---|---|---|---|\n"
    lines = [f"| {b} | {v:.3g} | {g} | {_met(v, g)} | {fig} | {s} |" for b, v, g, fig, s in rows]
    return header + "\n".join(lines) + "\n"


def _timeline(cfg: Config, **settings) -> str:
    """Markdown: one fold timed step by step (:func:`pipeline.bench.inputs.timeline`)."""
    from pipeline.bench import inputs as bench_input

    steps = bench_input.timeline(cfg, **settings)
    total = sum(seconds for _, seconds, _ in steps)
    b, epochs = cfg.backbones[0], settings.get("unfrozen_epochs", 1)
    lines = [f"{b.name} at {b.image_size or 'its default'} px, batch {cfg.train.batch_size}, fold 0 of "
             f"{cfg.folds.n_splits}, {'one unfrozen epoch' if epochs == 1 else f'{epochs} unfrozen epochs'}, "
             f"train.cache_images {cfg.train.cache_images}, {len(cfg.augment.tta)} TTA views.\n",
             "| step | seconds | share | what |", "|---|---|---|---|"]
    lines += [f"| {name} | {seconds:.1f} | {seconds / total:.0%} | {what} |" for name, seconds, what in steps]
    lines.append(f"| total | {total:.1f} | 100% | |")
    return "\n".join(lines) + "\n"


def _report(rows, output: str, quick: bool) -> Path:
    table = _table(rows)
    print(table)
    command = "make bench" + (" ARGS=--quick" if quick else "")
    path = Path(output)
    _write_section(path, "speed", f"## Speed: `{command}` on {machine()}, {time.strftime('%Y-%m-%d')}\n\n{table}")
    return path


def _met(value: float, goal: str) -> str:
    """yes/no for goals written as ``>= x`` or ``<= x``; blank for figures without a goal."""
    if goal.startswith((">=", "<=")):
        bound = float(goal[2:])
        return "yes" if (value >= bound if goal.startswith(">=") else value <= bound) else "no"
    return ""


def _write_section(path: Path, name: str, text: str) -> None:
    """Replace (or append) one section of BENCHMARKS.md, between its markers, leaving the rest."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    header = "# Benchmarks\n\nMeasured, with the command that reproduces each table.\n"
    previous = path.read_text() if path.exists() else header
    block = f"{start}\n{text.rstrip()}\n{end}"
    if start in previous and end in previous:
        head, rest = previous.split(start, 1)
        updated = head + block + rest.split(end, 1)[1]
    else:
        updated = previous.rstrip() + "\n\n" + block + "\n"
    artifacts.write_text(path, updated)
