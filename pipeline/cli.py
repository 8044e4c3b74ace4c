"""Command line: one subcommand per stage, ``python -m pipeline <stage> -c CFG [key=value ...]``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.core.errors import PipelineError, os_error_message

DEFAULT_CONFIG = "configs/demo.yaml"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="experiment YAML (default: %(default)s)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config")
    p.add_argument("--force", action="store_true", help="redo the stage even if its outputs are up to date")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo-data", help="write scikit-learn's digits into data/digits/ in Kaggle layout")
    p.add_argument("--root", default="data/digits")
    p.add_argument("--force", action="store_true")

    p = sub.add_parser("init",
                       help="read a competition folder: write configs/<name>.yaml and runs/<name>/data_report.md")
    p.add_argument("data_dir", help="the competition folder (train.csv or class sub-folders, sample_submission.csv, "
                                    "image folders)")
    p.add_argument("--name", help="experiment and config name (default: the folder's name)")
    p.add_argument("given", nargs="*", metavar="data.key=value",
                   help="data keys to take as given instead of inferring them (e.g. data.id_column=image)")

    p = sub.add_parser("folds", help="assign train rows to folds: folds/<exp>.csv")
    _common(p)

    p = sub.add_parser("train", help="train every backbone on every fold (or one of each)")
    _common(p)
    p.add_argument("--backbone", help="only this backbone (name from the config)")
    p.add_argument("--fold", type=int, help="only this fold")
    p.add_argument("--jobs", type=int, default=1, help="folds in parallel processes (one per GPU)")

    p = sub.add_parser("all", help="folds -> train -> ensemble -> leaderboard; --budget MIN plans the whole run "
                                   "across the backbones (frozen-only first, then unfrozen epochs where they fit)")
    _common(p)
    p.add_argument("--budget", type=float, help="minutes for the whole run (default: the config's time_budget_min)")

    p = sub.add_parser("pretrain",
                       help="train pretrain.backbones on pretrain.data: runs/<exp>/<id>/pretrained.safetensors")
    _common(p)
    p.add_argument("--backbone", help="only this id of pretrain.backbones")

    p = sub.add_parser("lr-find", help="LR range test for the frozen and unfrozen phases")
    _common(p)
    p.add_argument("--backbone")

    p = sub.add_parser("tune", help="Optuna learning-rate search per backbone")
    _common(p)
    p.add_argument("--backbone")
    p.add_argument("--workers", type=int, default=1, help="worker processes sharing one study")

    p = sub.add_parser("ensemble", help="ensemble the backbones' OOF predictions, write submissions")
    _common(p)

    p = sub.add_parser("predict", help="predict a test folder from the saved fold checkpoints and an ensemble")
    _common(p)
    p.add_argument("--test-dir", help="test images (default: data.root/data.test_dir)")
    p.add_argument("--sample", help="sample submission listing the test ids (default: data.sample_submission)")
    p.add_argument("--ensemble", help="ensemble method or model id (default: the method with the best nested CV)")
    p.add_argument("--out", help="submission path (default: submissions/<exp>-<method>-predict.csv)")

    p = sub.add_parser("bundle", help="write bundles/<exp>/ for a Kaggle code competition (offline predict)")
    _common(p)
    p.add_argument("--ensemble", help="ensemble method or model id (default: the method with the best nested CV)")
    p.add_argument("--fp16", action="store_true", help="store the weights in float16 (half the size)")
    p.add_argument("--out", help="bundle folder (default: bundles/<exp>)")

    p = sub.add_parser("pseudo", help="pseudo-label confident test images fold by fold: a new experiment <exp>-pseudo")
    _common(p)
    p.add_argument("--from", dest="source", required=True, help="ensemble method or model id whose fold models label")
    p.add_argument("--threshold", type=float, default=0.95,
                   help="minimum confidence (multilabel: every label >= T or <= 1 - T; default %(default)s)")
    p.add_argument("--name", help="the new experiment's name (default: <exp>-pseudo)")
    p.add_argument("--train", action="store_true",
                   help="then train, ensemble and rank the new experiment and print each model's CV change")

    p = sub.add_parser("label-issues", help="rank train rows whose label the OOF predictions contradict (cleanlab): "
                                            "runs/<exp>/label_issues.{csv,png}")
    _common(p)
    p.add_argument("--model", help="model id or ensemble method whose oof.csv to read (default: the best CV)")

    p = sub.add_parser("leaderboard", help="compare every model and ensemble on the metric")
    _common(p)

    p = sub.add_parser("submit", help="validate a submission and send it with the official kaggle CLI")
    _common(p)
    p.add_argument("--file", required=True)
    p.add_argument("-m", "--message", required=True)

    p = sub.add_parser("lb-sync", help="read public leaderboard scores of past submissions")
    _common(p)

    p = sub.add_parser("score", help="score a submission against a solution file (e.g. the demo's)")
    _common(p)
    p.add_argument("--file", required=True)
    p.add_argument("--solution", required=True)

    p = sub.add_parser("bench", help="throughput and memory benchmarks, printed as ratios")
    _common(p)
    p.add_argument("--quick", action="store_true", help="smaller sizes (for a smoke run)")
    p.add_argument("--output", default="BENCHMARKS.md")
    p.add_argument("--sections", default="speed,tune,lpft",
                   help="comma-separated: speed (ratios), tune (tuned vs default LRs), lpft (linear probe), "
                        "finetune (fine-tuning vs the frozen head and train.keep on the hidden test labels; "
                        "run it with CONFIG=configs/scenes.yaml), suite (anchor, fast, budget on the devdata sets)")
    p.add_argument("--data", default="../shared/devdata", help="suite: the folder of competitions")
    p.add_argument("--sets", default=None, help="suite: comma-separated set names (default: all four)")
    p.add_argument("--recipes", default=None, help="suite: comma-separated of anchor, fast, budget")
    p.add_argument("--budget", type=float, default=10.0, help="suite: the budget recipe's minutes")
    return parser


def pseudo_experiment(cfg, source: str, threshold: float = 0.95, name: str | None = None,
                      force: bool = False) -> Path:
    """``pseudo --train``: the pseudo-labelled experiment written, trained, ensembled and ranked
    beside its source; prints each model's CV change. Returns the new config's path."""
    from pipeline.config.schema import load_config
    from pipeline.stages.ensemble import run_ensemble
    from pipeline.stages.leaderboard import run_leaderboard
    from pipeline.stages.pseudo import cv_changes, run_pseudo
    from pipeline.stages.train import run_train

    config_path = run_pseudo(cfg, source, threshold=threshold, name=name, train=True)
    new_cfg = load_config(config_path)
    run_train(new_cfg, force=force)
    run_ensemble(new_cfg, force=force)
    run_leaderboard(cfg)  # both experiments' rows in submissions/leaderboard.csv
    run_leaderboard(new_cfg)
    print(cv_changes(cfg, new_cfg))
    return config_path


def lb_sync(cfg) -> Path:
    """``lb-sync``: public scores into the submissions log, then the leaderboard rebuilt with them."""
    from pipeline.stages.leaderboard import run_leaderboard
    from pipeline.stages.submit import run_lb_sync

    run_lb_sync(cfg)
    return run_leaderboard(cfg)


def run(args: argparse.Namespace) -> Path | None:
    if args.command == "demo-data":
        from pipeline.stages.demo_data import run_demo_data
        return run_demo_data(args.root, force=args.force)
    if args.command == "init":
        from pipeline.stages.init import run_init
        return run_init(args.data_dir, name=args.name, given_words=args.given)

    from pipeline.config.schema import load_config
    cfg = load_config(args.config, args.overrides)
    if args.command == "folds":
        from pipeline.stages.folds import run_folds
        return run_folds(cfg, force=args.force)
    if args.command == "train":
        from pipeline.stages.train import run_train
        return run_train(cfg, backbone=args.backbone, fold=args.fold, jobs=args.jobs, force=args.force)
    if args.command == "all":
        from pipeline.workflows import run_all
        return run_all(cfg, budget_min=args.budget, force=args.force)
    if args.command == "pretrain":
        from pipeline.stages.pretrain import run_pretrain
        return run_pretrain(cfg, backbone=args.backbone, force=args.force)
    if args.command == "lr-find":
        from pipeline.stages.lr_find import run_lr_find
        return run_lr_find(cfg, backbone=args.backbone, force=args.force)
    if args.command == "tune":
        from pipeline.stages.tune import run_tune
        return run_tune(cfg, backbone=args.backbone, workers=args.workers, force=args.force)
    if args.command == "ensemble":
        from pipeline.stages.ensemble import run_ensemble
        return run_ensemble(cfg, force=args.force)
    if args.command == "predict":
        from pipeline.stages.predict import run_predict
        return run_predict(cfg, test_dir=args.test_dir, sample=args.sample, method=args.ensemble, out=args.out)
    if args.command == "bundle":
        from pipeline.stages.bundle import run_bundle
        return run_bundle(cfg, method=args.ensemble, fp16=args.fp16, out=args.out)
    if args.command == "pseudo":
        if args.train:
            return pseudo_experiment(cfg, args.source, threshold=args.threshold, name=args.name, force=args.force)
        from pipeline.stages.pseudo import run_pseudo
        return run_pseudo(cfg, args.source, threshold=args.threshold, name=args.name)
    if args.command == "label-issues":
        from pipeline.stages.label_issues import run_label_issues
        return run_label_issues(cfg, model=args.model, force=args.force)
    if args.command == "leaderboard":
        from pipeline.stages.leaderboard import run_leaderboard
        return run_leaderboard(cfg)
    if args.command == "submit":
        from pipeline.stages.submit import run_submit
        return run_submit(cfg, args.file, args.message)
    if args.command == "lb-sync":
        return lb_sync(cfg)
    if args.command == "score":
        from pipeline.stages.submit import run_score
        return run_score(cfg, args.file, args.solution)
    if args.command == "bench":
        from pipeline.bench.report import run_bench
        from pipeline.bench.suite import SuiteOptions, options_from_words
        suite = options_from_words(SuiteOptions(), args.data, args.sets, args.recipes, args.budget)
        return run_bench(cfg, quick=args.quick, output=args.output,
                         sections=tuple(x.strip() for x in args.sections.split(",") if x.strip()), suite=suite)
    raise PipelineError(f"unknown command {args.command}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.data.images import restored_image_limit
    from pipeline.engine.fit import restored_torch_flags

    try:
        with restored_image_limit(), restored_torch_flags():  # a command leaves the process as it found it
            run(args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a permission or full-disk error anywhere in a stage: one line, not a traceback
        line = os_error_message(exc)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished folds, epochs and trials are kept; re-run the same command to resume",
              file=sys.stderr)
        return 130
    return 0
