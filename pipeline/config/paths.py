"""Where every artifact lives. All paths are built here and nowhere else."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.config.schema import Config


@dataclass(frozen=True)
class Paths:
    cfg: Config

    # ---- inputs
    @property
    def data_root(self) -> Path:
        return Path(self.cfg.data.root)

    @property
    def train_csv(self) -> Path | None:
        return self.data_root / self.cfg.data.train_csv if self.cfg.data.train_csv else None

    @property
    def train_dir(self) -> Path:
        return self.data_root / self.cfg.data.train_dir

    @property
    def test_dir(self) -> Path:
        return self.data_root / self.cfg.data.test_dir

    @property
    def sample_submission(self) -> Path:
        return self.data_root / self.cfg.data.sample_submission

    # ---- folds
    @property
    def folds_csv(self) -> Path:
        return Path(self.cfg.folds_dir) / f"{self.cfg.name}.csv"

    # ---- runs
    @property
    def exp_dir(self) -> Path:
        return Path(self.cfg.runs_dir) / self.cfg.name

    @property
    def image_cache_dir(self) -> Path:
        """Decoded, resized images (train.cache_images), shared by every model, fold and process."""
        return self.exp_dir / "cache"

    def backbone_dir(self, backbone: str) -> Path:
        return self.exp_dir / backbone.replace("/", "_")

    def fold_dir(self, backbone: str, fold: int) -> Path:
        return self.backbone_dir(backbone) / f"fold{fold}"

    def oof_csv(self, backbone: str) -> Path:
        return self.backbone_dir(backbone) / "oof.csv"

    def test_csv(self, backbone: str) -> Path:
        return self.backbone_dir(backbone) / "test.csv"

    def cv_json(self, backbone: str) -> Path:
        return self.backbone_dir(backbone) / "cv.json"

    def lr_find_dir(self, backbone: str) -> Path:
        return self.backbone_dir(backbone) / "lr_find"

    def tune_dir(self, backbone: str) -> Path:
        return self.backbone_dir(backbone) / "tune"

    def tuned_params(self, backbone: str) -> Path:
        return self.tune_dir(backbone) / "best.json"

    def feature_cache_dir(self, backbone: str) -> Path:
        return self.backbone_dir(backbone) / "features"

    @property
    def ensemble_dir(self) -> Path:
        return self.exp_dir / "ensemble"

    def ensemble_method_dir(self, method: str) -> Path:
        return self.ensemble_dir / method

    # ---- submissions
    @property
    def submissions_dir(self) -> Path:
        return Path(self.cfg.submissions_dir)

    def submission(self, method: str) -> Path:
        return self.submissions_dir / f"{self.cfg.name}-{method}.csv"

    @property
    def submissions_log(self) -> Path:
        return self.submissions_dir / "submissions_log.csv"

    @property
    def leaderboard_csv(self) -> Path:
        return self.submissions_dir / "leaderboard.csv"
