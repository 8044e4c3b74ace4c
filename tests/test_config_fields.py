"""No documented switch that does nothing: every config field is read somewhere in the pipeline.

Walks every dataclass field of :class:`~pipeline.config.Config` (recursively) and looks for a
read of it in ``pipeline/*.py`` other than ``config.py``: an attribute access ``.field`` or the
name as a string literal (``getattr(cfg, "field")``, ``parts["field"]``). A heuristic (a common
name such as ``seed`` also matches other objects' attributes), but it catches a key that no code
mentions at all.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

from pipeline.config import schema as config

PIPELINE = Path(config.__file__).resolve().parents[1]

# Fields read generically (by dataclasses.asdict or a loop over names), never by name. Keep short.
READ_GENERICALLY: set[str] = set()
# Fields that config.py itself turns into other settings when a config is loaded (seeds: variants).
EXPANDED_IN_CONFIG = {"seeds", "seed_group"}


def _dataclass_of(tp):
    """The dataclass inside ``tp`` (``Optional[X]``, ``list[X]``), or None."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        found = _dataclass_of(arg)
        if found is not None:
            return found
    return None


def config_fields(cls=config.Config, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, field name) of every leaf field under ``cls``."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        inner = _dataclass_of(hints[f.name])
        out += config_fields(inner, key + ".") if inner is not None else [(key, f.name)]
    return out


def _source() -> str:
    source = "\n".join(p.read_text() for p in sorted(PIPELINE.rglob("*.py")) if p.name != "schema.py")
    # a list of the keys to leave out of fingerprints names a key without reading it
    return re.sub(r"RUN_ONLY_KEYS = \([^)]*\)", "", source)


def test_the_walker_sees_every_section():
    keys = {k for k, _ in config_fields()}
    for key in ("data.task", "folds.n_bins", "backbones.drop_path_rate", "train.frozen.warmup_epochs",
                "train.compile", "augment.tta", "tune.pruner", "ensemble.hill_climb_max_iter",
                "submission.float_format", "runs_dir"):
        assert key in keys


def test_every_config_field_is_read_by_the_pipeline():
    source = _source()
    unread = [key for key, name in config_fields()
              if name not in READ_GENERICALLY | EXPANDED_IN_CONFIG
              and not re.search(rf"\.{name}\b|[\"']{name}[\"']", source)]
    assert not unread, (f"config keys {unread} are never read in pipeline/*.py: make them do what "
                        f"docs/configuration.md says or remove them (config.py, docs/configuration.md)")


def test_every_config_field_is_in_the_config_reference():
    """The config reference (docs/configuration.md, its Tuning table included) names every key a user can set."""
    reference = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    missing = [key for key, name in config_fields() if f"`{name}`" not in reference and f".{name}`" not in reference]
    assert not missing, f"config keys {missing} are not documented in docs/configuration.md"
