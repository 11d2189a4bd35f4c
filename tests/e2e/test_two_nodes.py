"""Two-node training through `zeroforge launch deepspeed` on two simulated nodes.

tests/netns/nodes.py builds the nodes: two network namespaces joined by a veth (10.77.0.1 and
10.77.0.2, private to the namespaces), an sshd in each, one hostfile slot per node. Everything
is real: pdsh, ssh, DeepSpeed's runner and per-node launcher, gloo over the veth, the training
loop, checkpoints on the (shared) file system, MLflow's sqlite store. The launcher itself runs
inside node1's namespace, as it would on a cluster's login or head node.

Needs root and `apt-get install -y openssh-server pdsh`; skips (saying which) otherwise.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.netns.nodes import IFNAME, NodesUnavailable, SimNodes, check_available

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
TINY_CONFIG = "configs/gpt2-tiny-cpu.yaml"
RUN_TIMEOUT_S = 180  # a hang guard, not a speed check: a healthy run takes ~30 s on 2 cores
# DeepSpeed JIT-builds its CPU comm op into TORCH_EXTENSIONS_DIR (~60 s on 2 cores). The ranks
# get their own directory, kept across sessions, so a rebuild here can never race with or
# invalidate the default cache that the other tests use.
EXTENSIONS_DIR = Path.home() / ".cache" / "torch_extensions" / "zeroforge-two-nodes"

pytestmark = pytest.mark.timeout(420)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory):
    try:
        check_available()
    except NodesUnavailable as e:
        pytest.skip(f"two simulated nodes unavailable: {e}")
    sim = SimNodes(tmp_path_factory.mktemp("nodes"))
    with sim.running():
        yield sim


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("store") / "pydoc"
    subprocess.run([PYTHON, "-m", "zeroforge.launch", "prep", "builtin:pydoc-topics", "--out",
                    str(out), "--val-fraction", "0.1"], check=True, cwd=REPO,
                   capture_output=True)
    return out


@pytest.fixture(scope="module")
def extensions_dir() -> Path:
    """The ranks' TORCH_EXTENSIONS_DIR, with DeepSpeed's CPU comm op built before any launch.

    Built here, in one local process with the ranks' PATH (venv first, so the same ninja), so
    the ranks find it up to date: two ranks building it at once on 2 cores under a launch
    timeout, in a fresh checkout whose venv path changed the build flags, hung CI. A `lock`
    left by a build that was killed would make every later build wait forever: drop it."""
    op_dir = EXTENSIONS_DIR / "deepspeed_shm_comm"
    (op_dir / "lock").unlink(missing_ok=True)
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(EXTENSIONS_DIR),
           "PATH": f"{Path(PYTHON).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    build = ("from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder; "
             "ShareMemCommBuilder().load()")
    subprocess.run([PYTHON, "-c", build], check=True, env=env, cwd=REPO, capture_output=True,
                   timeout=600)
    return EXTENSIONS_DIR


def overrides(store: Path, run_dir: Path, **extra: object) -> list[str]:
    base: dict[str, object] = {
        "data.store": store, "run_dir": run_dir, "data.seq_len": 32, "data.val_windows": 4,
        "train.micro_batch_size": 2, "train.grad_accum": 1, "train.log_every": 1,
        "train.eval_every": 0, "train.sample_tokens": 0, "optim.warmup_steps": 2,
        "optim.lr": 3e-3, "deepspeed.zero_optimization.stage": 2, "tracking.backend": "none",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def start(nodes: SimNodes, run_dir: Path, args: list[str], extensions: Path,
          env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
    """`zeroforge launch deepspeed` inside node1's namespace, in its own session."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "launch.log"
    cmd = [*nodes.exec_prefix("node1"), PYTHON, "-m", "zeroforge.launch", "launch", "deepspeed",
           "--hostfile", str(nodes.hostfile), "--ssh-config", str(nodes.ssh_config),
           "--config", TINY_CONFIG, *args]
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("MLFLOW_", "ZEROFORGE_", "DS_ENV_FILE"))}
    full_env.update({"GLOO_SOCKET_IFNAME": IFNAME, "TORCH_EXTENSIONS_DIR": str(extensions),
                     "PYTHONUNBUFFERED": "1", **(env or {})})
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return proc, log


def wait(proc: subprocess.Popen, log: Path, nodes: SimNodes) -> int:
    try:
        return proc.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # SIGKILL, never SIGTERM/SIGINT: DeepSpeed's runner answers those with `pkill -f` on
        # every host, and these "hosts" share the PID namespace with everything else here.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        nodes.kill_strays()
        raise AssertionError(f"launch hung; log ends:\n{log.read_text()[-5000:]}") from None


def assert_no_leftovers(nodes: SimNodes) -> None:
    """Nothing but the sshd listeners may remain in either namespace (sessions close quickly
    after the job; give them a moment before calling it an orphan)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if not any(nodes.stray_pids(n) for n in ("node1", "node2")):
            return
        time.sleep(0.2)
    strays = {n: nodes.describe(nodes.stray_pids(n)) for n in ("node1", "node2")}
    nodes.kill_strays()
    raise AssertionError(f"processes left behind: {strays}")


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def committed_steps(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    return sorted(int(p.parent.name.split("_")[1]) for p in root.glob("step_*/COMMITTED"))


def rank_pids(nodes: SimNodes, node: str) -> list[int]:
    """Training rank processes (not DeepSpeed's per-node launcher) running on `node`."""
    out = []
    for pid in nodes.pids(node):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"zeroforge.launch" in argv and any(a.startswith(b"--local_rank=") for a in argv):
            out.append(pid)
    return out


def test_zero2_across_two_nodes_keeps_ranks_in_sync(nodes, store, extensions_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = overrides(store, run_dir, **{"train.max_steps": 6, "checkpoint.every": 3})
    proc, log = start(nodes, run_dir, args, extensions_dir, {"ZEROFORGE_DEBUG_CHECKSUM": "1"})
    code = wait(proc, log, nodes)
    output = log.read_text()
    assert code == 0, output[-5000:]
    # One rank per node, started over ssh by pdsh (its lines carry the host name).
    assert "node1: " in output and "node2: " in output
    records = [r for r in metrics(run_dir) if "train/loss" in r]
    assert [r["step"] for r in records] == list(range(1, 7))
    for r in records:
        sums = [r["debug/param_checksum_rank0"], r["debug/param_checksum_rank1"]]
        assert sums[0] == sums[1], r  # identical parameters on both nodes after every step
    assert records[-1]["train/loss"] < records[0]["train/loss"]
    assert committed_steps(run_dir) == [3, 6]
    # Each node's rank wrote its own ZeRO-2 optimizer shard into the shared checkpoint.
    shards = sorted(p.name for p in (run_dir / "checkpoints/step_00000006").glob("zero_pp_*"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt",
                      "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert_no_leftovers(nodes)


def test_killing_one_nodes_rank_fails_the_whole_job(nodes, store, extensions_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    db = run_dir / "mlflow.db"
    args = overrides(store, run_dir, **{
        "train.max_steps": 10_000, "checkpoint.every": 1, "checkpoint.keep_last": 100,
        "tracking.backend": "mlflow", "tracking.tracking_uri": f"sqlite:///{db}",
        "tracking.system_metrics": "false", "tracking.experiment": "two-nodes"})
    proc, log = start(nodes, run_dir, args, extensions_dir)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while len(committed_steps(run_dir)) < 2:
            assert proc.poll() is None, f"run ended early:\n{log.read_text()[-5000:]}"
            assert time.monotonic() < deadline, "no checkpoint committed in time"
            time.sleep(0.1)
        victims = rank_pids(nodes, "node2")
        assert len(victims) == 1, nodes.describe(nodes.pids("node2"))
        # Freeze node2's rank first: node1's rank then blocks at its next collective, so the
        # checkpoints committed by now are all there will ever be if the failure is handled.
        os.kill(victims[0], signal.SIGSTOP)
        time.sleep(1.0)
        before = committed_steps(run_dir)
        logged = max(r["step"] for r in metrics(run_dir))
        os.kill(victims[0], signal.SIGKILL)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        nodes.kill_strays()
        raise
    code = wait(proc, log, nodes)
    output = log.read_text()
    assert code != 0, output[-5000:]
    assert "pdsh" in output and "node2: ssh exited with exit code" in output, output[-5000:]
    assert_no_leftovers(nodes)
    # Nothing was committed after the peer died: not the step in flight, not any later one.
    after = committed_steps(run_dir)
    assert after == before, (before, after)
    assert max(after) <= logged
    tags = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    for tag in tags:
        if int(tag.split("_")[1]) > max(after):
            assert not (run_dir / "checkpoints" / tag / "COMMITTED").exists(), tag
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{max(after):08d}"
    # Rank 0 (node1) saw the collective fail and closed its MLflow run as FAILED.
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("two-nodes")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
