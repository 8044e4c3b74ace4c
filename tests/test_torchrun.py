"""DDP across two node ranks: ``torchrun --nnodes=2 --nproc_per_node=1 --rdzv_backend=c10d`` as two
agent processes on this machine (loopback, gloo on CPU), one per node rank, each in its own working
directory, training the tiny experiment (timm's ``test_efficientnet``, ``weights: none``, 32 px,
2 folds) into one shared ``runs/`` folder, as several machines would on a shared file system.

Checked: the run meets the file contracts (each fold's ``history.csv``, ``best.safetensors``,
``oof.csv``/``test.csv``; the backbone's ``oof.csv``, ``test.csv``, ``cv.json``); only rank 0 writes
(every worker process records, through a Python audit hook, each file it opens for writing,
creates, renames or removes under ``runs/``); and the result is the single-process run's within the
tolerance of docs/scale-out.md: the frozen epochs equal to 1e-5 (the head trains on all rows' pooled
features, sharded and gathered), and after the unfrozen epoch (each rank its own shuffled shard,
BatchNorm statistics per half-batch) every OOF probability within ``PROB_ATOL`` and the OOF score
within ``SCORE_ATOL``.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO_ROOT, shrunk_raw_config
from safetensors import safe_open

from pipeline.config.paths import Paths
from pipeline.config.schema import config_from_dict
from pipeline.data.tables import read_folds, read_test_table
from pipeline.stages.folds import run_folds
from pipeline.stages.train import run_train

TORCHRUN = Path(sys.executable).parent / "torchrun"
pytestmark = [pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to this Python"),
              pytest.mark.usefixtures("one_torch_thread")]

WORDS = ["train.num_workers=0", "augment.train=[]", "folds.n_splits=2", "train.frozen.epochs=2",
         "train.unfrozen.epochs=1"]
PROB_ATOL = 0.05  # per OOF probability, 2 ranks vs 1 process (measured: 0.008)
SCORE_ATOL = 0.15  # OOF accuracy, as tests/test_scale.py's one-node test (measured: 0.06)
FROZEN_ATOL = 1e-5

# Imported by every Python process started with this folder first on PYTHONPATH: a torchrun worker
# (RANK set) appends each write under WATCHED_DIR to <WRITES_LOG>.rank<RANK>
SITECUSTOMIZE = '''
import os, sys
RANK, WATCHED, LOG = os.environ.get("RANK"), os.environ.get("WATCHED_DIR"), os.environ.get("WRITES_LOG")
if RANK is not None and WATCHED and LOG:
    _log = open(f"{LOG}.rank{RANK}", "w", buffering=1)
    _WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    _EVENTS = {"os.rename": 2, "os.remove": 1, "os.mkdir": 1, "os.rmdir": 1, "os.truncate": 1, "os.link": 2,
               "os.symlink": 2, "shutil.rmtree": 1, "shutil.move": 2, "tempfile.mkstemp": 1, "tempfile.mkdtemp": 1}

    def _watched(path):
        if isinstance(path, (str, bytes, os.PathLike)):
            path = os.path.abspath(os.fsdecode(path))
            return path == WATCHED or path.startswith(WATCHED + os.sep)
        return False

    def _hook(event, args):
        if event == "open":
            path, mode, flags = args
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & _WRITE_FLAGS)
            paths = [path] if writes else []
        else:
            paths = list(args[:_EVENTS[event]]) if event in _EVENTS else []
        for path in paths:
            if _watched(path):
                _log.write(f"{event} {os.fsdecode(path)}\\n")

    sys.addaudithook(_hook)
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process(raw: dict, root: Path):
    cfg = config_from_dict({**raw, "runs_dir": str(root / "single")}, WORDS)
    run_folds(cfg)
    run_train(cfg)
    return cfg


def two_node_ranks(config: Path, root: Path, runs: Path) -> tuple[list[str], dict[int, list[str]], float]:
    """Two torchrun agents, node ranks 0 and 1, one rendezvous; (their outputs, writes per rank, seconds).

    The c10d rendezvous gives the nodes their ranks as they meet (``--node_rank`` is read only by the
    static one, and torchrun says so), so writes are told apart by the workers' ``RANK``, not by node."""
    hook_dir = root / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
    port, log = free_port(), root / "writes"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",  # both nodes on the loopback
           "PYTHONPATH": os.pathsep.join([str(hook_dir), str(REPO_ROOT)]), "WATCHED_DIR": str(runs),
           "WRITES_LOG": str(log)}
    started = time.monotonic()
    agents = []
    for node in (0, 1):
        cwd = root / f"node{node}"
        cwd.mkdir()
        cmd = [str(TORCHRUN), "--nnodes=2", "--nproc_per_node=1", f"--node_rank={node}", "--rdzv_backend=c10d",
               f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=pipeline-test", "--local_addr=127.0.0.1",
               "-m", "pipeline", "train", "-c", str(config), *WORDS]
        agents.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True))
    outs = []
    for agent in agents:
        try:
            out, _ = agent.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for a in agents:
                a.kill()
            raise
        outs.append(out)
    seconds = time.monotonic() - started
    for agent, out in zip(agents, outs):
        assert agent.returncode == 0, out[-4000:]
    writes = {int(p.suffix.removeprefix(".rank")): p.read_text().splitlines() for p in root.glob("writes.rank*")}
    return outs, writes, seconds


def test_two_node_ranks_write_the_contracts_from_rank_0_alone_close_to_one_process(digits_root, tmp_path):
    raw = shrunk_raw_config(digits_root, tmp_path)
    started = time.monotonic()
    single = single_process(raw, tmp_path)
    single_seconds = time.monotonic() - started
    runs = tmp_path / "ddp"
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump({**raw, "runs_dir": str(runs)}, sort_keys=False))
    outs, writes, seconds = two_node_ranks(config, tmp_path, runs)
    print(f"single process: {single_seconds:.1f} s (in this process); two node ranks: {seconds:.1f} s (2 agents)")

    # rank 0 alone writes: it wrote every file, the other rank nothing
    assert sorted(writes) == [0, 1], writes
    assert writes[1] == [], writes[1][:10]
    assert any(line.endswith("best.safetensors") for line in writes[0])
    ddp = config_from_dict({**raw, "runs_dir": str(runs)}, WORDS)
    assert not list(runs.rglob("*.tmp")), "a temporary file was left"

    # the contracts
    paths, name, id_col = Paths(ddp), "test_efficientnet", "image_id"
    table, test_ids = read_folds(ddp), read_test_table(ddp)[id_col]
    pred = [f"pred_{c}" for c in range(10)]
    for k in range(2):
        fold_dir = paths.fold_dir(name, k)
        history = pd.read_csv(fold_dir / "history.csv")
        assert list(history.columns) == ["epoch", "phase", "lr_head", "lr_backbone", "train_loss", "valid_loss",
                                         "valid_accuracy", "seconds", "images_per_s"]
        assert history["phase"].tolist() == ["frozen", "frozen", "unfrozen"]
        with safe_open(str(fold_dir / "best.safetensors"), "pt") as weights:
            assert len(list(weights.keys())) > 10
        fold_oof = pd.read_csv(fold_dir / "oof.csv", dtype={id_col: str})
        assert sorted(fold_oof[id_col]) == sorted(table.loc[table.fold == k, id_col])
        assert pd.read_csv(fold_dir / "test.csv", dtype={id_col: str})[id_col].tolist() == test_ids.tolist()
    oof = pd.read_csv(paths.oof_csv(name), dtype={id_col: str})
    assert list(oof.columns) == [id_col, "fold", *pred]
    assert sorted(oof[id_col]) == sorted(table[id_col]) and oof[id_col].is_unique
    np.testing.assert_allclose(oof[pred].sum(axis=1), 1.0, atol=1e-5)
    test = pd.read_csv(paths.test_csv(name), dtype={id_col: str})
    assert list(test.columns) == [id_col, *pred] and test[id_col].tolist() == test_ids.tolist()
    cv = json.loads(paths.cv_json(name).read_text())
    assert cv["metric"] == "accuracy" and len(cv["folds"]) == 2

    # close to one process: the frozen epochs to rounding, the unfrozen one within the tolerance
    one = Paths(single)
    for k in range(2):
        a, b = (pd.read_csv(p.fold_dir(name, k) / "history.csv") for p in (one, paths))
        frozen = ["train_loss", "valid_loss", "valid_accuracy"]
        np.testing.assert_allclose(a.loc[a.phase == "frozen", frozen], b.loc[b.phase == "frozen", frozen],
                                   atol=FROZEN_ATOL, rtol=0)
    a = pd.read_csv(one.oof_csv(name), dtype={id_col: str}).set_index(id_col).loc[oof[id_col]]
    np.testing.assert_allclose(a[pred].to_numpy(), oof[pred].to_numpy(), atol=PROB_ATOL, rtol=0)
    single_cv = json.loads(one.cv_json(name).read_text())
    assert abs(single_cv["oof"] - cv["oof"]) <= SCORE_ATOL, (single_cv["oof"], cv["oof"])
    print(f"max |p_ddp - p_single| {np.abs(a[pred].to_numpy() - oof[pred].to_numpy()).max():.4f}; OOF accuracy "
          f"{cv['oof']:.4f} vs {single_cv['oof']:.4f}")
