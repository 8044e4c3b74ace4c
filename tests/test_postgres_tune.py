"""Optuna on a real PostgreSQL server: tune workers as separate processes, each in its own working
directory with its own ``runs/`` and ``folds/`` (as on separate machines), share one study through
``tune.storage=postgresql://...``.

The module starts one server from the ``pgserver`` wheel (PostgreSQL binaries on PyPI, offline),
listening on 127.0.0.1 with password (SCRAM) authentication for a user ``tuner``, and one database
per test. Workers run the tiny test experiment (timm's ``test_efficientnet``, ``weights: none``,
32 px, CPU) on frozen-only trials, so a trial costs well under a second and the time is process
start-up. Checked: exactly ``tune.trials`` finished trials, none run twice, a report in every
worker's folder, the password in no printed line or file, a SIGKILLed worker's trial failed by
heartbeat and run again by the other worker, and a bad password or an unreachable server as one
line naming the host.
"""
from __future__ import annotations

import copy
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import REPO_ROOT, shrunk_raw_config
from optuna.trial import TrialState

from pipeline.cli import main
from pipeline.config.schema import config_from_dict
from pipeline.stages.folds import run_folds
from pipeline.stages.tune import FINISHED

pgserver = pytest.importorskip("pgserver", reason="pip install -e '.[dev]' (pgserver runs the test's PostgreSQL)")
pytest.importorskip("psycopg", reason="pip install -e '.[scale]' (psycopg: SQLAlchemy's postgresql:// driver)")

USER, PASSWORD = "tuner", "Tr1al-s3cret-pw"
DATABASES = ("shared", "killed", "refused")
STUDY = "demo-test_efficientnet"
TRIALS = 4
WORDS = ["train.num_workers=0", "augment.train=[]", "tune.frozen_epochs=1", "tune.unfrozen_epochs=0",
         f"tune.trials={TRIALS}", "tune.pruner=none"]

# A worker "on another machine" (its trials carry another host name, so only the heartbeat can tell
# it died) that hangs in its first trial until it is killed
STUCK = ("import socket, sys, time; socket.gethostname = lambda: 'another-machine'; "
         "import pipeline.stages.tune as tune; tune.train_fold = lambda job: time.sleep(3600); "
         "from pipeline.cli import main; sys.exit(main(sys.argv[1:]))")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A PostgreSQL server on 127.0.0.1:port (pgserver's binaries; its own start listens on a socket only)."""

    def __init__(self, root: Path):
        self.pg = pgserver.get_server(root / "pgdata", cleanup_mode=None)  # stopped by stop(), below
        self.pg.psql(f"CREATE USER {USER} WITH PASSWORD '{PASSWORD}';\n"
                     + "".join(f"CREATE DATABASE {db} OWNER {USER};\n" for db in DATABASES))
        (self.pg.pgdata / "pg_hba.conf").write_text("local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n")
        self.port = free_port()
        sockets = self.pg.get_postmaster_info().socket_path
        self.ctl("-m", "fast", "-o", f"-h 127.0.0.1 -p {self.port} -k {sockets.parent}", "-l",
                 str(self.pg.pgdata / "log"), "restart")

    def ctl(self, *args: str) -> None:
        pgserver.pg_ctl(["-w", *args], pgdata=self.pg.pgdata, user=self.pg.system_user, timeout=60)

    def url(self, db: str, password: str | None = PASSWORD, port: int | None = None) -> str:
        auth = f"{USER}:{password}" if password else USER
        return f"postgresql://{auth}@127.0.0.1:{port or self.port}/{db}"

    def stop(self) -> None:
        self.ctl("-m", "immediate", "stop")


@pytest.fixture(scope="module")
def server():
    # not under pytest's tmp folder: as root, pgserver runs PostgreSQL as a user "pgserver" who must
    # reach the data folder, and pytest keeps its own folder private
    root = Path(tempfile.mkdtemp(prefix="pipeline-pg-"))
    started = time.monotonic()
    srv = Server(root)
    print(f"PostgreSQL up on port {srv.port} in {time.monotonic() - started:.1f} s")
    yield srv
    srv.stop()
    shutil.rmtree(root, ignore_errors=True)


def worker_dirs(root: Path, digits_root: Path, n: int) -> tuple[Path, list[Path]]:
    """One config file (relative runs/ and folds/) and ``n`` working directories, each with its own
    folds file made by the folds stage (seeded: the same file on every machine)."""
    raw = shrunk_raw_config(digits_root, root)
    raw.update(runs_dir="runs", folds_dir="folds", submissions_dir="submissions")
    config = root / "exp.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    dirs = []
    for i in range(n):
        cwd = root / f"machine{i}"
        cwd.mkdir()
        local = copy.deepcopy(raw)
        local["folds_dir"] = str(cwd / "folds")
        run_folds(config_from_dict(local, []))
        dirs.append(cwd)
    return config, dirs


def launch(config: Path, cwd: Path, storage: str, env: dict | None = None, code: str | None = None):
    head = [sys.executable, "-c", code] if code else [sys.executable, "-m", "pipeline"]
    cmd = [*head, "tune", "-c", str(config), *WORDS, f"tune.storage={storage}"]
    base = {k: v for k, v in os.environ.items() if k != "PGPASSWORD"}
    env = {**base, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    return out


def study(server: Server, db: str) -> optuna.Study:
    return optuna.load_study(study_name=STUDY, storage=server.url(db))


def assert_no_password(dirs: list[Path], *printed: str) -> None:
    for text in printed:
        assert PASSWORD not in text
    for cwd in dirs:
        for path in cwd.rglob("*"):
            if path.is_file():
                assert PASSWORD.encode() not in path.read_bytes(), path


def test_two_workers_on_two_working_directories_share_one_study(server, digits_root, tmp_path):
    config, dirs = worker_dirs(tmp_path, digits_root, 2)
    started = time.monotonic()
    # one worker has the password in the URL, the other in PGPASSWORD (libpq reads it): both work
    procs = [launch(config, dirs[0], server.url("shared")),
             launch(config, dirs[1], server.url("shared", password=None), env={"PGPASSWORD": PASSWORD})]
    outs = [finish(p) for p in procs]
    print(f"two workers, {TRIALS} trials: {time.monotonic() - started:.1f} s")

    trials = study(server, "shared").get_trials()
    finished = [t for t in trials if t.state in FINISHED]
    assert len(finished) == TRIALS
    assert all(t.state != TrialState.RUNNING for t in trials)
    assert all(t.user_attrs.get("surplus") for t in trials if t.state == TrialState.FAIL)
    params = [tuple(sorted(t.params.items())) for t in finished]
    assert len(set(params)) == TRIALS, "a parameter set ran twice"
    assert sum(bool(t.user_attrs.get("config_params")) for t in finished) == 1  # queued once, by one worker
    assert len({t.number for t in trials}) == len(trials)
    by_pid = {}
    for t in finished:
        by_pid[t.user_attrs["pid"]] = by_pid.get(t.user_attrs["pid"], 0) + 1
    print(f"finished trials per worker process: {sorted(by_pid.values(), reverse=True)}")

    best = [yaml.safe_load((d / "runs/demo/test_efficientnet/tune/best.json").read_text()) for d in dirs]
    for b in best:  # each machine's report is the whole study's
        assert b["trials"] == TRIALS and b["study"] == STUDY
        assert b["storage"] == f"postgresql://{USER}:***@127.0.0.1:{server.port}/shared" or \
            b["storage"] == f"postgresql://{USER}@127.0.0.1:{server.port}/shared"
    assert best[0]["best_trial"] == best[1]["best_trial"] and best[0]["value"] == best[1]["value"]
    shared = yaml.safe_load((dirs[0] / "runs/demo/test_efficientnet/tune/config.yaml").read_text())
    assert shared["tune"]["storage"] == f"postgresql://{USER}:***@127.0.0.1:{server.port}/shared"
    assert_no_password(dirs, *outs)


def test_a_worker_killed_mid_trial_is_failed_by_heartbeat_and_its_trial_runs_again(server, digits_root, tmp_path):
    config, dirs = worker_dirs(tmp_path, digits_root, 2)
    stuck = launch(config, dirs[0], server.url("killed"), code=STUCK)
    deadline = time.monotonic() + 90
    running = []
    while not running and time.monotonic() < deadline:
        time.sleep(0.3)
        try:
            # a trial is RUNNING in the database before its parameters are suggested and its
            # user attributes set: wait until the stuck worker is inside train_fold
            running = [t for t in study(server, "killed").get_trials(states=(TrialState.RUNNING,))
                       if t.params and "host" in t.user_attrs]
        except KeyError:  # no study yet
            pass
    assert running, "the stuck worker never started a trial"
    os.kill(stuck.pid, signal.SIGKILL)
    stuck.communicate()
    killed = running[0]
    assert killed.user_attrs["host"] == "another-machine"

    started = time.monotonic()
    out = finish(launch(config, dirs[1], server.url("killed")))
    seconds = time.monotonic() - started
    print(f"the other worker, {TRIALS} trials and one retried: {seconds:.1f} s")

    trials = study(server, "killed").get_trials()
    assert trials[killed.number].state == TrialState.FAIL  # by heartbeat: no pid check for another host
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE
    assert retried[0].params == killed.params and retried[0].user_attrs.get("config_params")
    assert retried[0].user_attrs["host"] == socket.gethostname()
    assert sum(t.state in FINISHED for t in trials) == TRIALS
    assert all(t.state != TrialState.RUNNING for t in trials)
    best = yaml.safe_load((dirs[1] / "runs/demo/test_efficientnet/tune/best.json").read_text())
    assert best["trials"] == TRIALS and best["failed"] == 1
    assert_no_password(dirs, out)


@pytest.mark.parametrize("case", ["wrong password", "nothing listening"])
def test_a_bad_password_or_unreachable_server_is_one_line_naming_the_host(server, digits_root, tmp_path, capsys,
                                                                          monkeypatch, case):
    config, dirs = worker_dirs(tmp_path, digits_root, 1)
    url = server.url("refused", password="not-" + PASSWORD) if case == "wrong password" else \
        server.url("refused", port=free_port())
    monkeypatch.chdir(dirs[0])
    code = main(["tune", "-c", str(config), *WORDS, f"tune.storage={url}"])
    captured = capsys.readouterr()
    assert code == 2
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: config key 'tune.storage'"), err
    assert "127.0.0.1" in err and "Traceback" not in err
    assert ("password authentication failed" in err) if case == "wrong password" else ("refused" in err.lower())
    assert PASSWORD not in captured.out + captured.err
    assert not (dirs[0] / "runs").exists()
