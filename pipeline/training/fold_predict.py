"""A fold's predictions: logits of any rows under TTA views, frozen-backbone features (computed once
per backbone, view and image set), and the fold's OOF and test predictions frames."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

from pipeline.core import artifacts, distributed
from pipeline.data.images import PATH
from pipeline.engine.features import FeatureStore, compute_features
from pipeline.engine.fit import Runtime, activate_mean, predict_logits
from pipeline.training.fold_data import FoldData


class FoldPredictor:
    """Predictions for the rows of ``data`` (and its test table) through the fold's models."""

    def __init__(self, data: FoldData, runtime: Runtime, store: FeatureStore, images_key: str):
        self.data, self.rt, self.store, self.images_key = data, runtime, store, images_key

    def logits(self, model: nn.Module, rows: np.ndarray, test: bool = False, views=("identity",)) -> list[torch.Tensor]:
        """Logits per view for ``rows`` (sharded over DDP ranks and gathered back in order). On a GPU
        every view of a batch goes in one forward pass of up to twice the evaluation batch; on a
        CPU in passes of at most the training batch, which ``Runtime.passes`` splits further to
        the size a CPU runs fastest (BENCHMARKS.md, cpu)."""
        max_images = 2 * self.data.eval_batch_size if self.rt.cuda else self.data.batch_size
        logits = predict_logits(model, self.data.eval_loader(rows, test), self.rt, views, max_images=max_images)
        return [distributed.gather_rows(v) for v in logits]

    def frozen_features(self, model: nn.Module, view: str = "identity", test: bool = False) -> torch.Tensor:
        """Pooled features of every train (or test) row as TTA ``view`` shows them, through the frozen
        backbone: one pass per backbone, view and image set, kept in the run's store and on disk so
        that every fold (and, when nothing is unfrozen, every prediction) reuses it."""
        table = self.data.table(test)
        name = f"{'test' if test else 'train'}{'' if view == 'identity' else '-' + view}"
        key = self.images_key + ("" if name == "train" else "-" + name + artifacts.fingerprint(list(table[PATH])))
        rows = distributed.shard(np.arange(len(table)))
        loader = self.data.loader(self.data.dataset(rows, train=False, test=test))
        compute = lambda: distributed.gather_rows(compute_features(model, loader, self.rt, view))  # noqa: E731
        cache_dir = self.data.job.feature_cache_dir if distributed.is_main() else None
        feats, source = self.store.features(key, cache_dir, compute, name)
        if source != "memory":
            print(f"frozen backbone: features of {len(feats)} {name} images {source} "
                  f"({'cache' if source == 'disk' else 'one pass'})")
        return feats.to(self.rt.device)

    def frames(self, job, model: nn.Module, head_only: bool) -> tuple[pd.DataFrame, pd.DataFrame | None]:
        """OOF (validation rows) and test predictions of ``model``, averaged over the TTA views.
        ``head_only``: a frozen-only model, whose head is applied to cached per-view features (the
        backbone sees each image and view once per backbone, not once per fold)."""
        spec, views, id_col = job.spec, job.cfg.augment.tta, job.cfg.data.id_column
        valid = self.data.valid_idx
        with torch.no_grad():
            oof_preds = activate_mean(spec, self._view_logits(model, valid, False, views, head_only))
            oof = spec.predictions_frame(job.table[id_col].to_numpy()[valid], oof_preds, id_col)
            oof.insert(1, "fold", job.fold)
            test = None
            if job.test is not None:
                rows = np.arange(len(job.test))
                test_preds = activate_mean(spec, self._view_logits(model, rows, True, views, head_only))
                test = spec.predictions_frame(job.test[id_col], test_preds, id_col)
        self.data.release_eval_loaders()  # the fold's last pass: its loader workers can go
        return oof, test

    def _view_logits(self, model, rows, test: bool, views, head_only: bool) -> list[torch.Tensor]:
        if not head_only:
            return self.logits(model, rows, test, views)
        head, out = model.get_classifier().eval(), []
        for view in views:
            feats = self.frozen_features(model, view, test)
            selected = feats if test else feats[torch.as_tensor(rows).to(feats.device)]
            out.append(head(selected).float().cpu())
        return out
