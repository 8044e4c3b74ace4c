"""The run-only config keys: the one list of keys that change how a run goes (its speed, its
logging, where its files go) but not a number of its result, and how comparisons and digests
leave them out.

"Not a number" means the same computation: floating-point rounding may differ, as it does
between two runs on a GPU (kernel choice, batch shapes, memory layout). A key that can change
what is computed (data, model, optimisation, augmentation, precision, the epoch kept) is a
result key, even when its effect is small.

Every "what does this result depend on" comparison uses this list:

* digests (fold, pretrain, lr-find, folds and ensemble stages) hash a run-only key at its
  default (:func:`digest_section`), so toggling it keeps the digest, and digests written before
  the key joined the list still match for a config that leaves it at its default; the keys in
  :data:`LEFT_OUT_OF_DIGESTS` were always left out and stay out;
* flat comparisons (the tune study's objective, predict's and the bundle's checkpoint check)
  leave run-only keys out on both sides (:func:`setting_changes`), so records written before a
  key joined the list still compare.

Each comparison still has its own scope (which sections it looks at at all); that is not this
list's concern: e.g. a fold's digest does not look at ``ensemble.*``, which is no run-only key.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable

from pipeline.config.schema import Config, flatten

RUN_ONLY_KEYS = (
    # -- where things are written
    "name",  # the experiment's folder, study and tracking names
    "runs_dir",  # where runs are written
    "folds_dir",  # where folds files are written; a fold's split is the file's content, a digest input
    "submissions_dir",  # where submission files are written
    "tune.storage",  # where the Optuna study is stored
    "submission.competition",  # the Kaggle slug `make submit` uploads to
    # -- whether a run goes, not what it computes
    "data.max_image_pixels",  # refuses larger images before anything trains: a run stops or reads the same pixels
    # -- choices whose outcome the resolved config holds
    "time_budget_min",  # `make all`'s plan: each stage's resolved config holds the epochs it planned
    "train.time_budget_min",  # chooses train.unfrozen.epochs; the resolved config holds the planned epochs
    "train.use_tuned",  # chooses the LRs; the resolved config holds the LRs used
    # -- speed: the same computation
    "train.executor",  # where folds run, here or as Ray tasks: a fold's randomness is a function of seed, fold, epoch
    "train.ray_address",  # which Ray cluster runs them
    "train.device",  # which device computes; on CUDA train.amp then sets the precision, a result key of its own
    "train.num_workers",  # loader processes: each row's augmentation is seeded by epoch seed and row, not worker
    "train.cache_images",  # the same decoded, resized pixels, from one memory-mapped file instead of image files
    "train.cache_features",  # the frozen head on the same pooled features, cached or recomputed every batch
    "train.compile",  # torch.compile of the same model, eager where it fails
    "train.channels_last",  # a memory layout of the same tensors
    "train.deterministic",  # deterministic kernels of the same computation: repeatable and slower
    # -- logging
    "tracking.backend",  # which tracker is told what happened; it never changes what happens
    "tracking.uri",  # where the tracker writes
)

# Run-only keys that digests have always left out (keys added after the digests were: left out, so that the
# digests of finished folds still match); every other run-only key is hashed at its default
LEFT_OUT_OF_DIGESTS = frozenset({"train.num_workers", "train.use_tuned", "train.device", "train.executor",
                                 "train.ray_address"})


def is_run_only(key: str) -> bool:
    """Whether the dotted config key ``key`` (``train.compile``) is run-only."""
    return key in RUN_ONLY_KEYS


def result_settings(flat: dict[str, Any]) -> dict[str, Any]:
    """Flat dotted settings (:func:`~pipeline.config.schema.flatten`) without the run-only keys."""
    return {k: v for k, v in flat.items() if not is_run_only(k)}


def setting_changes(before: dict[str, Any], after: dict[str, Any], ignore: Iterable[str] = ()) -> list[str]:
    """The sorted keys whose values differ between two flat settings dicts (a key missing on one
    side counts as None there), run-only keys and ``ignore`` left out: a record written before a key
    became run-only still compares with one written after."""
    ignore = set(ignore)
    return [k for k in sorted(set(before) | set(after))
            if not is_run_only(k) and k not in ignore and before.get(k) != after.get(k)]


@functools.lru_cache(maxsize=1)
def _defaults() -> dict[str, Any]:
    return flatten(dataclasses.asdict(Config(name="defaults")))


def default(key: str) -> Any:
    """The schema's default of a dotted config key."""
    return _defaults()[key]


def digest_section(section: str, values: dict[str, Any]) -> dict[str, Any]:
    """A config section (``dataclasses.asdict``) as digests hash it: each run-only key at its
    default (the keys of :data:`LEFT_OUT_OF_DIGESTS` left out), so that toggling one keeps the
    digest; ``section`` is the section's dotted name (``train``)."""
    out = {}
    for k, v in values.items():
        key = f"{section}.{k}"
        if key in LEFT_OUT_OF_DIGESTS:
            continue
        if is_run_only(key):
            v = default(key)
        elif isinstance(v, dict):
            v = digest_section(key, v)
        out[k] = v
    return out
