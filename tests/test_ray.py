"""``train.executor: ray`` on a real 2-node Ray cluster on this machine (Ray's own cluster utilities:
a head node and a worker node, one CPU each, separate processes, on the loopback address).

One cluster for the module (it starts in seconds) and one local run as the reference: the Ray run's
predictions equal it, its folds ran on both nodes, a fold whose worker process is killed mid-fold
(SIGKILL after its first epoch) is retried and ends the same, and a finished fold is not sent again.
"""
from __future__ import annotations

import copy
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
import yaml
from conftest import shrunk_raw_config
from safetensors.torch import save_file

# the cluster's nodes on 127.0.0.1, so nothing leaves the machine (Ray's switch, read when ray is imported;
# elsewhere Ray binds the interface address a node would use to reach others)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_DISABLE_DOCKER_CPU_WARNING", "1")
ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from pipeline.config.paths import Paths  # noqa: E402
from pipeline.config.run_only import result_settings  # noqa: E402
from pipeline.config.schema import config_from_dict, flatten  # noqa: E402
from pipeline.stages.folds import run_folds  # noqa: E402
from pipeline.stages.train import run_train  # noqa: E402
from pipeline.training.executors import OWNER_FILE, WORK_DIR  # noqa: E402
from pipeline.training.fingerprint import fold_outputs  # noqa: E402

N_FOLDS = 3
OBJECT_STORE = 80 * 1024 ** 2  # bytes per node: Ray's floor is about 75 MiB
NODE_LINE = re.compile(r"^test_efficientnet fold (\d): .* on node 127\.0\.0\.1 \((\w{8})\)"
                       r"(, resumed after epoch \d+)?$", re.M)


@pytest.fixture(scope="module")
def cluster():
    """(head node id, worker node, worker node id, the nodes' Ray temporary directory)."""
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's sockets live here (107-byte path limit)
    os.makedirs("/tmp/ray", exist_ok=True)  # Ray writes the current cluster's address there, whatever temp_dir says
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                          "object_store_memory": OBJECT_STORE, "temp_dir": temp})
    worker = nodes.add_node(num_cpus=1, object_store_memory=OBJECT_STORE, temp_dir=temp)
    ray.init(address=nodes.address, log_to_driver=False)
    yield nodes.head_node.node_id, worker, worker.node_id, temp, nodes.address
    ray.shutdown()
    nodes.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def raw(digits_root, tmp_path_factory):
    """The tiny test experiment, its weights from a file of this machine (the driver sends it to the tasks)."""
    root = tmp_path_factory.mktemp("ray-exp")
    raw = shrunk_raw_config(digits_root, root)
    raw["train"]["num_workers"] = 0
    raw["folds"]["n_splits"] = N_FOLDS
    torch.manual_seed(0)
    save_file(timm.create_model("test_efficientnet", num_classes=10).state_dict(), root / "weights.safetensors")
    raw["backbones"][0]["weights"] = str(root / "weights.safetensors")
    return raw


def make(raw: dict, runs: Path, *overrides: str):
    raw = copy.deepcopy(raw)
    raw["runs_dir"] = str(runs)
    return config_from_dict(raw, list(overrides))


@pytest.fixture(scope="module")
def local(raw):
    """The reference: the same experiment trained in this process, one fold after another."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a Ray worker with one CPU
    cfg = make(raw, Path(raw["folds_dir"]).parent / "runs-local")
    run_folds(cfg)
    run_train(cfg)
    torch.set_num_threads(threads)
    return cfg


def on_ray(raw, runs: Path, address: str):
    return make(raw, runs, "train.executor=ray", f"train.ray_address={address}")


def assert_same_predictions(a, b):
    slug = a.backbones[0].slug
    pa, pb = Paths(a), Paths(b)
    for name in ("oof.csv", "test.csv"):
        for da, db in [(pa.backbone_dir(slug), pb.backbone_dir(slug))] + [(pa.fold_dir(slug, k), pb.fold_dir(slug, k))
                                                                          for k in range(N_FOLDS)]:
            pd.testing.assert_frame_equal(pd.read_csv(da / name), pd.read_csv(db / name), check_exact=False, atol=1e-6,
                                          rtol=0)
    for k in range(N_FOLDS):  # and the rest of each fold's folder, but for the times and the run-only keys
        assert (pa.fold_dir(slug, k) / "kept.json").read_text() == (pb.fold_dir(slug, k) / "kept.json").read_text()
        ya, yb = (yaml.safe_load((p.fold_dir(slug, k) / "config.yaml").read_text()) for p in (pa, pb))
        assert result_settings(flatten(ya)) == result_settings(flatten(yb))
        ha, hb = (pd.read_csv(p.fold_dir(slug, k) / "history.csv").drop(columns=["seconds", "images_per_s"])
                  for p in (pa, pb))
        pd.testing.assert_frame_equal(ha, hb, check_exact=False, atol=1e-6, rtol=0)


def test_folds_on_ray_equal_a_local_run_and_ran_on_both_nodes(cluster, raw, local, tmp_path, capsys):
    head_id, _, worker_id, _, address = cluster
    cfg = on_ray(raw, tmp_path / "runs", address)
    run_train(cfg)
    out = capsys.readouterr().out
    lines = NODE_LINE.findall(out)
    assert sorted(int(k) for k, _, _ in lines) == list(range(N_FOLDS)), out
    assert {node for _, node, _ in lines} == {head_id[:8], worker_id[:8]}, out
    assert_same_predictions(local, cfg)
    assert Paths(cfg).cv_json(cfg.backbones[0].slug).exists()

    # (d) a finished fold is not sent again; a fold whose files are gone is, alone
    run_train(cfg)
    assert not NODE_LINE.findall(capsys.readouterr().out)
    fold_dir = Paths(cfg).fold_dir(cfg.backbones[0].slug, 1)
    fold0 = fold_outputs(Paths(cfg).fold_dir(cfg.backbones[0].slug, 0), True)
    kept = [p.stat().st_mtime_ns for p in fold0]
    (fold_dir / "oof.csv").unlink()
    run_train(cfg)
    assert [k for k, _, _ in NODE_LINE.findall(capsys.readouterr().out)] == ["1"]
    assert [p.stat().st_mtime_ns for p in fold0] == kept
    assert_same_predictions(local, cfg)


def test_a_worker_killed_mid_fold_is_retried_to_the_same_predictions(cluster, raw, local, tmp_path, capsys):
    _, _, worker_id, temp, address = cluster
    cfg = on_ray(raw, tmp_path / "runs", address)
    killed: list[dict] = []

    def kill_a_worker_after_its_first_epoch():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            for owner in Path(temp, WORK_DIR).glob(f"*/{OWNER_FILE}"):
                resume = list(owner.parent.rglob("resume.safetensors"))
                try:
                    info = pd.read_json(owner, typ="series")
                except ValueError:  # being written
                    continue
                if resume and info["node_id"] == worker_id:
                    os.kill(int(info["pid"]), signal.SIGKILL)
                    killed.append(dict(info))
                    return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_a_worker_after_its_first_epoch, daemon=True)
    killer.start()
    run_train(cfg)
    killer.join(timeout=1)
    out = capsys.readouterr().out
    assert killed, f"no fold on the worker node was seen mid-fold:\n{out}"
    lines = NODE_LINE.findall(out)
    assert sorted(int(k) for k, _, _ in lines) == list(range(N_FOLDS)), out
    assert any(resumed for _, _, resumed in lines), f"the retried fold did not resume from its checkpoint:\n{out}"
    assert_same_predictions(local, cfg)
