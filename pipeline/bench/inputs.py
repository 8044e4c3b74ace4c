"""Benchmarks through the real input path: JPEG files, decoding, resizing, augmenting, collating.

The speed section's synthetic rows feed the model pre-made tensors; these feed it the way a
training run does (a :class:`~pipeline.training.trainer.FoldTrainer`'s own datasets and loaders), and
compare with the bare model fed from tensors already in memory, in one run on one machine:

* a pipeline epoch through the real train loader / the bare forward+backward loop;
* the train loader alone (no model) in images/s with 0, 1 and all workers / the bare model step;
* prediction with TTA through the real evaluation loader / bare forward x views;
* the image cache's build time and size, and reduced JPEG decoding: speed and effect on accuracy;
* ``gpu``: absolute images/s on CUDA (two models, bf16 vs fp16, synthetic vs real loader).

Image sets: the config's own images (the scenes photos are 150 px) and the same images
re-saved larger (``scaled_copy``: 500 px by default), since competition photos are rarely small.
A copy re-saved from 150 px holds no detail beyond 150 px, so it measures decoding cost, not
what a reduced decode might lose on a truly large photo (the decode rows say so).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.bench.measure import solution_path
from pipeline.config.paths import Paths
from pipeline.config.schema import Config
from pipeline.core import artifacts
from pipeline.core.memory import resident_mib
from pipeline.data.cache import ImageCache
from pipeline.data.datasets import ImageDataset, SeededSampler
from pipeline.data.images import PATH, load_image
from pipeline.data.tables import read_test_table, read_train_table, task_spec
from pipeline.domain.transforms import eval_transform
from pipeline.engine.fit import Stepper, build_optimizer, build_scheduler, predict_logits, run_batches
from pipeline.training import phases


def scaled_copy(cfg: Config, side: int, root: Path) -> Config:
    """The config's data with every image re-saved as a ``side`` x ``side`` JPEG (quality 90) under
    ``root`` (made once; kept for later runs while the source and the side are the same), and the
    config pointing there.

    The source images are found as every stage finds them (the train and test tables resolve each
    id to its file: ids with or without an extension, class sub-folders); each copy is saved as
    ``<id>.jpg`` and the copy's config sets ``data.image_extension: .jpg``, so an id ``a`` and an
    id ``a.png`` both resolve to their JPEG copy through the same resolution.
    """
    from PIL import Image

    src, d = Paths(cfg), cfg.data
    tables = {"train": read_train_table(cfg, check_readable=False), "test": read_test_table(cfg, check_readable=False)}
    stamp = (f"{side} px JPEG copies named <id>.jpg of {src.data_root.resolve()}: "
             f"{len(tables['train'])} train, {len(tables['test'])} test images\n")
    marker = root / ".complete"
    if not marker.exists() or marker.read_text() != stamp:
        shutil.rmtree(root, ignore_errors=True)
        for folder, table in tables.items():
            for image_id, source in zip(table[d.id_column], table[PATH]):
                target = root / folder / f"{image_id}.jpg"
                target.parent.mkdir(parents=True, exist_ok=True)
                with Image.open(source) as im:
                    im.convert("RGB").resize((side, side), Image.BICUBIC).save(target, quality=90)
        if d.train_csv is not None:  # the table as read (excluded ids dropped): the copy has no exclude list
            artifacts.write_csv(root / "train.csv", tables["train"].drop(columns=[PATH]))
        shutil.copy(src.sample_submission, root / "sample_submission.csv")
        solution = src.sample_submission.parent / "solution.csv"
        if solution.exists():
            shutil.copy(solution, root / "solution.csv")
        artifacts.write_text(marker, stamp)
    return cfg.replace(data=dataclasses.replace(
        d, root=str(root), train_dir="train", test_dir="test", image_extension=".jpg", exclude_ids=None,
        train_csv=None if d.train_csv is None else "train.csv", sample_submission="sample_submission.csv"))


def _trainer(cfg: Config, rows: int | None, size: int, cache: bool, workers: int | None, runs: Path):
    """A fold-0 trainer over the first ``rows`` train images (every 4th validates), images at
    ``size`` px, the image cache on or off, ``workers`` loader workers (None: the default)."""
    from pipeline.training.trainer import FoldJob, FoldTrainer

    table = read_train_table(cfg, check_readable=False)
    table = table.iloc[:rows].reset_index(drop=True) if rows else table
    table["fold"] = (np.arange(len(table)) % 4 != 0).astype(int)  # fold 0: a quarter of the rows validate
    c = cfg.replace(name=f"bench-input-{Path(cfg.data.root).name}", runs_dir=str(runs),
                    train=dataclasses.replace(cfg.train, cache_images=cache, num_workers=workers))
    bcfg = dataclasses.replace(c.backbones[0], image_size=size)
    return FoldTrainer(FoldJob(c, bcfg, task_spec(c, table), table, 0, progress=False))


def _in_memory(trainer, rows: np.ndarray) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The rows decoded and resized once, normalised on the device, in training batches: what the
    bare loops are fed."""
    ds = trainer.data.dataset(rows, train=False)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.as_tensor(trainer.data.y[rows])
    b = trainer.data.batch_size
    return [(trainer.rt.images(x[i:i + b]), y[i:i + b].to(trainer.rt.device)) for i in range(0, len(x), b)]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _best(fns: dict, repeats: int) -> dict:
    """Best of ``repeats`` seconds per function, the functions interleaved so drift hits all alike."""
    times = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            _sync()
            times[k] = min(times[k], time.perf_counter() - start)
    return times


def bench_epoch(trainer, repeats: int) -> dict:
    """(a) One epoch of the unfrozen phase's train loop through the real loader (SeededSampler,
    persistent workers, the pipeline's step) vs the bare forward+backward loop over the same
    images already in memory (same model, train mode, torch's AdamW)."""
    t = trainer
    phase = t.tcfg.unfrozen
    optimizer = build_optimizer(t.model, t.tcfg, phase, frozen=False)
    steps = -(-len(t.data.train_idx) // t.data.batch_size)
    stepper = Stepper(optimizer, build_scheduler(optimizer, phase, steps), t.rt, t.tcfg, t.model.parameters(),
                      steps_per_epoch=steps)
    ds = t.data.dataset(t.data.train_idx, train=True)
    sampler = SeededSampler(len(ds))
    loader = t.data.loader(ds, sampler=sampler, persistent=True)
    bare_data = _in_memory(t, t.data.train_idx)
    bare_opt = torch.optim.AdamW(t.model.parameters(), lr=1e-5)

    def pipeline_epoch():
        sampler.set_epoch(sampler.seed + 1)
        phases.train_mode(t.model, t.tcfg)
        run_batches(loader, lambda b: phases.model_loss(t, t.model, b, None), stepper, len(loader), "bench",
                    progress=False)

    def bare_epoch():
        phases.train_mode(t.model, t.tcfg)
        for x, y in bare_data:
            with t.rt.autocast():
                loss = F.cross_entropy(t.model(x).float(), y.long())
            loss.backward()
            bare_opt.step()
            bare_opt.zero_grad(set_to_none=True)

    pipeline_epoch()  # warm-up: allocations, loader workers, cudnn autotuning
    bare_epoch()
    times = _best({"pipeline": pipeline_epoch, "bare": bare_epoch}, repeats)
    n = len(t.data.train_idx)
    return {"pipeline_img_s": n / times["pipeline"], "bare_img_s": n / times["bare"], "images": n,
            "workers": t.data.workers}


def bench_loader(trainer, workers: tuple[int, ...]) -> dict[int, float]:
    """(b) The train loader alone, images/s, per worker count: a second pass over a persistent
    loader (workers already started, as from the second epoch on)."""
    rates = {}
    for w in workers:
        trainer.data.workers = w
        ds = trainer.data.dataset(np.arange(len(trainer.job.table)), train=True)
        sampler = SeededSampler(len(ds))
        loader = trainer.data.loader(ds, sampler=sampler, persistent=True)
        for _ in loader:  # start-up pass
            pass
        sampler.set_epoch(1)
        start = time.perf_counter()
        for _ in loader:
            pass
        rates[w] = len(ds) / (time.perf_counter() - start)
        del loader
    return rates


def bench_predict(trainer, views: tuple[str, ...], repeats: int) -> dict:
    """(c) Prediction with TTA through the fold's evaluation loader (views stacked in one forward
    pass, evaluation batches of twice the training batch) vs the bare forward pass over the same
    images in memory at the training batch; and the old way (one forward per view, training batch).
    Every row of the trainer's table is predicted."""
    t = trainer
    rows = np.arange(len(t.job.table))
    model = t.model.eval()
    bare_data = _in_memory(t, rows)

    @torch.no_grad()
    def bare():
        for x, _ in bare_data:
            with t.rt.autocast():
                model(x)

    per_view = torch.utils.data.DataLoader(t.data.dataset(rows, train=False), batch_size=t.data.batch_size,
                                           num_workers=t.data.workers, pin_memory=t.rt.cuda)
    fns = {"pipeline": lambda: t.predict(model, rows, views=views), "bare": bare,
           "per_view": lambda: predict_logits(model, per_view, t.rt, views, max_images=t.data.batch_size)}
    fns["pipeline"]()  # warm-up: the persistent evaluation loader, the cache's pages
    times = _best(fns, repeats)
    n = len(rows)
    return {"pipeline_img_s": n / times["pipeline"], "bare_img_s": n / times["bare"],
            "per_view_img_s": n / times["per_view"], "views": len(views), "images": n}


def bench_cache_build(cfg: Config, size: int, runs: Path) -> dict:
    """Decoding every train image into the cache file once: seconds, file size, and the resident
    memory a process gains by reading all of it through the memory map (shared page cache)."""
    table = read_train_table(cfg, check_readable=False)
    path = ImageCache.file_for(runs / "cache-build", table[PATH], size, "bicubic", cfg.augment.resize)
    path.unlink(missing_ok=True)
    start = time.perf_counter()
    ImageCache.build(path, table[PATH], size, "bicubic", cfg.augment.resize)
    seconds = time.perf_counter() - start
    before = resident_mib()
    cache = ImageCache.open(path)
    total = sum(int(cache[i][0, 0, 0]) for i in range(len(cache)))  # touch every image
    after = resident_mib()
    grown = float("nan") if before is None or after is None else after - before
    del cache, total
    return {"seconds": seconds, "images": len(table), "mib": path.stat().st_size / 2**20, "rss_mib": grown,
            "threads": os.cpu_count()}


def bench_reduced_decode(cfg: Config, size: int, probe: bool) -> dict:
    """Reduced (DCT-scaled) JPEG decoding before the exact resize against the full decode: decode +
    resize images/s over the train images, the mean absolute pixel difference of the results (0-255),
    and, with ``probe``, the hidden-test score of a linear probe on each version's features."""
    table = read_train_table(cfg, check_readable=False)
    paths, policy = list(table[PATH]), cfg.augment.resize
    resize = eval_transform(size, "bicubic", policy)
    full = lambda p: resize(image=load_image(p))["image"]  # noqa: E731
    reduced = lambda p: resize(image=load_image(p, size, policy))["image"]  # noqa: E731
    times = _best({"full": lambda: [full(p) for p in paths], "reduced": lambda: [reduced(p) for p in paths]}, 2)
    diff = float(np.mean([(full(p).float() - reduced(p).float()).abs().mean() for p in paths[:100]]))
    out = {"full_img_s": len(paths) / times["full"], "reduced_img_s": len(paths) / times["reduced"],
           "pixel_diff": diff, "images": len(paths)}
    if probe:
        out.update(_probe_accuracy(cfg, size))
    return out


def _probe_accuracy(cfg: Config, size: int) -> dict:
    """The hidden-test score (``cfg.metric``; ``solution.csv`` beside the sample submission) of a
    linear probe (the pipeline's) on the frozen backbone's features of the fully decoded and of the
    reduced-decoded images."""
    from pipeline.bench.quality import solution_targets
    from pipeline.domain.metrics import get_metric
    from pipeline.engine.backbones import create_backbone, data_config
    from pipeline.engine.features import compute_features
    from pipeline.engine.fit import Runtime, activate_mean, make_loss, score
    from pipeline.engine.probe import fit_linear_probe

    train, test = read_train_table(cfg, check_readable=False), read_test_table(cfg, check_readable=False)
    spec = task_spec(cfg, train)
    y_test = solution_targets(cfg, spec, test)
    metric = get_metric(cfg.metric, spec.task)
    bcfg = dataclasses.replace(cfg.backbones[0], image_size=size)
    model = create_backbone(bcfg, spec.num_outputs).eval()
    dc = data_config(model, bcfg)
    rt = Runtime.create(cfg.train, dc["mean"], dc["std"])
    rt.prepare_model(model)
    out = {"metric": metric.name}
    for name, decode in (("full", None), ("reduced", (size, cfg.augment.resize))):
        feats = []
        for frame in (train, test):
            ds = ImageDataset(frame[PATH], transform=eval_transform(size, dc["interpolation"], cfg.augment.resize),
                              decode=decode)
            feats.append(compute_features(model, torch.utils.data.DataLoader(ds, batch_size=64), rt).cpu())
        y = torch.tensor(np.array(spec.encode(train)))
        weight, bias, _ = fit_linear_probe(spec, make_loss(spec, cfg.train), feats[0], y, seed=0)
        logits = feats[1] @ weight.detach().T + bias.detach()
        out[f"{name}_score"] = float(score(metric, spec, y_test, activate_mean(spec, [logits])))
    return out

# ---------------------------------------------------------------------------- the sections


QUICK = {"size": 32, "rows": 48, "repeats": 1, "large_side": 64, "decode_side": 64, "probe": False}


def input_rows(cfg: Config, quick: bool, bench_dir: Path, *, size: int = 224, rows: int = 64, repeats: int = 2,
               large_side: int = 500, decode_side: int = 1000, probe: bool = True) -> list[tuple]:
    """The real-input-path rows of the speed table (see the module docstring).

    ``size``: the model's input side; ``rows``: the train rows the epoch and prediction rows time;
    ``repeats``: best of; ``large_side`` and ``decode_side``: the sides of the larger copies and of
    the copies the reduced decode reads; ``probe``: the reduced decode's hidden-test row (left out,
    with a line, where the data has no ``solution.csv``). ``quick``: ``QUICK``'s sizes and the tiny
    ``test_efficientnet``, whatever the other arguments say."""
    if quick:
        from pipeline.config.schema import BackboneConfig
        cfg = cfg.replace(backbones=[BackboneConfig(name="test_efficientnet", weights="none")],
                          train=dataclasses.replace(cfg.train, batch_size=16))
        size, rows, repeats, large_side, decode_side, probe = QUICK.values()
    if probe and not solution_path(cfg).exists():
        print(f"--sections input: no hidden test labels ({solution_path(cfg)}): the reduced decode's probe row is "
              f"left out")
        probe = False
    side = _side(cfg)
    sets = {f"{side} files": cfg,
            f"{large_side}px files": scaled_copy(cfg, large_side, bench_dir / f"images-{large_side}px")}
    runs = bench_dir / "runs"
    out = []
    model = f"{cfg.backbones[0].name} {size}px batch {cfg.train.batch_size}"
    loader_rates, bare_rate = {}, None
    for label, c in sets.items():
        for cache in (False, True):
            trainer = _trainer(c, rows, size, cache, None, runs)
            r = bench_epoch(trainer, repeats)
            bare_rate = r["bare_img_s"] if bare_rate is None else max(bare_rate, r["bare_img_s"])
            out.append((f"pipeline epoch through the real loader / bare fwd+bwd from memory ({label}, "
                        f"cache {'on' if cache else 'off'})", r["pipeline_img_s"] / r["bare_img_s"],
                        ">= 0.9" if cache else "-", f"{r['pipeline_img_s']:.1f} vs {r['bare_img_s']:.1f} img/s",
                        f"{model}, {r['images']} train images, {r['workers']} loader workers (the default here)"))
            if not cache:
                del trainer
                continue
            p = bench_predict(trainer, ("identity", "hflip"), repeats)
            out.append((f"prediction with TTA through the real loader x views / bare fwd ({label}, "
                        f"cache on)", p["pipeline_img_s"] * p["views"] / p["bare_img_s"], ">= 0.9",
                        f"{p['pipeline_img_s']:.1f} img/s x {p['views']} views vs {p['bare_img_s']:.1f} img/s; one "
                        f"forward per view at the train batch (before): {p['per_view_img_s']:.1f} img/s x {p['views']}",
                        f"{model}, {p['images']} images, views stacked, eval batch {2 * cfg.train.batch_size}"))
            del trainer
    all_workers = os.cpu_count() or 1
    for label, c in sets.items():
        for cache in (False, True):
            trainer = _trainer(c, None, size, cache, 0, runs)
            loader_rates[(label, cache)] = rates = bench_loader(trainer, tuple(sorted({0, 1, all_workers})))
            del trainer
            goal = ">= 3" if cache else "-"
            out.append((f"train loader alone / bare model step, images/s ({label}, cache {'on' if cache else 'off'})",
                        rates[0] / bare_rate, goal,
                        " / ".join(f"{rates[w]:.0f}" for w in sorted(rates)) + " img/s with "
                        + " / ".join(map(str, sorted(rates))) + f" workers vs {bare_rate:.1f} img/s",
                        f"measured: 0 workers (the default on {all_workers} cores); augment.train of the config, "
                        f"{size}px"))
    r = bench_cache_build(sets[f"{large_side}px files"], size, runs)
    out.append(("image cache: build time (train images)", r["seconds"], "-",
                f"{r['seconds']:.1f} s for {r['images']} images ({r['images'] / r['seconds']:.0f} img/s, "
                f"{r['threads']} threads); file {r['mib']:.1f} MiB; reading all of it adds {r['rss_mib']:.0f} MiB "
                f"of resident (shared, page-cache) memory", f"{large_side}px JPEGs -> {size}px"))
    big = scaled_copy(cfg, decode_side, bench_dir / f"images-{decode_side}px")
    r = bench_reduced_decode(big, size, probe=probe)
    out.append(("reduced JPEG decode: decode+resize images/s, reduced / full", r["reduced_img_s"] / r["full_img_s"],
                "-", f"{r['reduced_img_s']:.0f} vs {r['full_img_s']:.0f} img/s; mean |pixel difference| "
                     f"{r['pixel_diff']:.2f} of 255", f"{r['images']} {decode_side}px JPEGs -> {size}px"))
    if probe:
        out.append((f"reduced JPEG decode: linear-probe {r['metric']} on the hidden test, reduced - full",
                    r["reduced_score"] - r["full_score"], "-", f"{r['reduced_score']:.4f} vs {r['full_score']:.4f}",
                    f"{cfg.backbones[0].name} {size}px, {decode_side}px copies of {side} images (no detail beyond "
                    f"{side} to lose)"))
    return out


def _side(cfg: Config) -> str:
    """The first train image's size, ``150px`` or ``384x512px``: the image the train table resolves
    its first id to."""
    from PIL import Image

    first = read_train_table(cfg, check_readable=False)[PATH].iloc[0]
    with Image.open(first) as im:
        return f"{im.size[0]}px" if im.size[0] == im.size[1] else f"{im.size[0]}x{im.size[1]}px"


GPU_MODELS = (("efficientnet_lite0", 224), ("convnext_tiny", 224))


def gpu_rows(cfg: Config, bench_dir: Path, *, models: tuple[tuple[str, int], ...] = GPU_MODELS, side: int = 500,
             steps: int = 10, repeats: int = 3) -> list[tuple]:
    """Absolute images/s on CUDA for each (timm name, px) of ``models``, synthetic (``steps``
    batches, best of ``repeats``) and through the real loader over ``side`` px JPEG copies;
    :class:`~pipeline.bench.measure.CannotRun` without a GPU."""
    from pipeline.bench.measure import CannotRun, bench_inference, bench_train_step

    if not torch.cuda.is_available():
        raise CannotRun("no GPU found (torch.cuda.is_available() is False)")
    runs, out = bench_dir / "runs", []
    big = scaled_copy(cfg, side, bench_dir / f"images-{side}px")
    for name, size in models:
        for amp in ("bf16", "fp16"):
            c = cfg.replace(train=dataclasses.replace(cfg.train, amp_dtype=amp))
            setting = f"{name} {size}px batch {c.train.batch_size}, AMP {amp}, channels_last"
            r = bench_train_step(c, name, size, c.train.batch_size, steps, repeats)
            out.append((f"train step, synthetic ({name}, {amp})", r["pipeline_img_s"], "-",
                        f"{r['pipeline_img_s']:.0f} img/s (bare {r['bare_img_s']:.0f})", setting))
            r = bench_inference(c, name, size, 2 * c.train.batch_size, steps, repeats, ["identity"])
            out.append((f"inference, synthetic ({name}, {amp})", r["pipeline_img_s"], "-",
                        f"{r['pipeline_img_s']:.0f} img/s (bare {r['bare_img_s']:.0f})", setting))
            big_c = big.replace(train=c.train, backbones=[dataclasses.replace(c.backbones[0], name=name,
                                                                              weights="none")])
            trainer = _trainer(big_c, None, size, True, None, runs)
            r = bench_epoch(trainer, 2)
            out.append((f"train epoch through the real loader, cache on ({name}, {amp})", r["pipeline_img_s"], "-",
                        f"{r['pipeline_img_s']:.0f} img/s vs bare {r['bare_img_s']:.0f}: "
                        f"{r['pipeline_img_s'] / r['bare_img_s']:.2f}", f"{setting}, {r['workers']} workers, "
                                                                        f"{r['images']} {side}px JPEGs"))
            p = bench_predict(trainer, ("identity", "hflip"), 2)
            out.append((f"prediction with 2 TTA views through the real loader ({name}, {amp})",
                        p["pipeline_img_s"] * p["views"], "-",
                        f"{p['pipeline_img_s'] * p['views']:.0f} img x views/s vs bare {p['bare_img_s']:.0f}: "
                        f"{p['pipeline_img_s'] * p['views'] / p['bare_img_s']:.2f}", setting))
            del trainer
            torch.cuda.empty_cache()
    return out


def timeline(cfg: Config, unfrozen_epochs: int = 1) -> list[tuple[str, float, str]]:
    """Where the time of one fold goes, at the config's own settings (one unfrozen epoch unless
    told): (step, seconds, what it covers), timed step by step in this process."""
    import subprocess
    import sys

    from pipeline.data.images import check_images_readable
    from pipeline.data.tables import read_folds, read_test_table
    from pipeline.stages.folds import run_folds
    from pipeline.training.trainer import FoldJob, FoldTrainer

    c = cfg.replace(name=f"{cfg.name}-timeline", runs_dir=str(Path(cfg.runs_dir) / "bench" / "timeline"),
                    train=dataclasses.replace(cfg.train, unfrozen=dataclasses.replace(cfg.train.unfrozen,
                                                                                      epochs=unfrozen_epochs)))
    shutil.rmtree(Paths(c).exp_dir, ignore_errors=True)
    steps = []

    def timed(name: str, what: str, fn):
        start = time.perf_counter()
        result = fn()
        steps.append((name, time.perf_counter() - start, what))
        return result

    timed("start-up", "a fresh `python -c 'import pipeline.stages.train'` (torch, timm, albumentations, ...)",
          lambda: subprocess.run([sys.executable, "-c", "import pipeline.stages.train"], check=True))
    run_folds(c)
    table, test = read_folds(c), read_test_table(c, check_readable=False)
    timed("image check", f"decoding all {len(table) + len(test)} train and test images once (first run only: "
                         f"later runs find the stamp)",
          lambda: [check_images_readable(t, c.data.id_column, "bench") for t in (table, test)])
    spec = task_spec(c, table)
    trainer = timed("model + train image cache", "timm model, bundled weights, decoding the train images into the "
                                                 "cache file (train.cache_images)",
                    lambda: FoldTrainer(FoldJob(c, c.backbones[0], spec, table, 0, test=test, progress=False)))
    n_frozen = 1 if c.train.linear_probe else c.train.frozen.epochs
    if c.train.linear_probe:
        timed("linear probe", f"features of {len(table)} train images (one forward pass) + the probe's fits",
              trainer.linear_probe_phase)
    else:
        timed("frozen phase", "the head's epochs on cached features", lambda: trainer.frozen_phase(c.train.frozen, 0))
    timed("unfrozen epoch", "", lambda: trainer.unfrozen_phase(c.train.unfrozen, n_frozen, n_frozen))
    rows = [r for r in trainer.state.history if r["phase"] == "unfrozen"]
    loop = sum(r["seconds"] for r in rows)
    name, total, _ = steps.pop()
    steps.append(("unfrozen epoch: train loop", loop, f"{len(trainer.data.train_idx)} images forward+backward through "
                                                      f"the train loader, per epoch"))
    steps.append(("unfrozen epoch: validation + checkpoint", total - loop,
                  f"{len(trainer.data.valid_idx)} validation images, scoring, best/resume checkpoints"))
    trainer.state.describe_kept(c.train.linear_probe)
    trainer.final_model = trainer.state.load_best(trainer.eval_model)
    timed("predictions", f"OOF ({len(trainer.data.valid_idx)}) and test ({len(test)}) images x "
                         f"{len(c.augment.tta)} TTA views", trainer.predictions)
    return steps
