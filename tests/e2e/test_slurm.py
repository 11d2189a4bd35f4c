"""`zeroforge launch slurm` / `slurm-prep` on a real one-machine Slurm cluster.

tests/slurm/start_slurm.sh installs (when missing) and starts munged, slurmctld and slurmd with
a generated slurm.conf under a temp dir; every job here is a real `sbatch` of the rendered
script, whose `srun` starts 2 CPU ranks of the real training loop (gloo). Needs root (packages,
SlurmUser=root); without it the module skips, saying so.

DeepSpeed's JIT-built CPU op is reused through one TORCH_EXTENSIONS_DIR for all jobs (see
`_torch_extensions_dir`): the first job of a fresh machine builds it (30-60 s), later ones load it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from zeroforge.pipeline.errors import EXIT_PREEMPTED
from zeroforge.pipeline.tracking.metrics_file import read_metrics

REPO = Path(__file__).resolve().parents[2]
START = REPO / "tests" / "slurm" / "start_slurm.sh"
STOP = REPO / "tests" / "slurm" / "stop_slurm.sh"
TINY = str(REPO / "configs" / "gpt2-tiny-cpu.yaml")
JOB_TIMEOUT_S = 240
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def slurm_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Environment (SLURM_CONF, TORCH_EXTENSIONS_DIR) that reaches a running test cluster."""
    if os.geteuid() != 0:
        pytest.skip("a real Slurm test cluster needs root (apt-get install slurm-wlm munge, "
                    "SlurmUser=root); run the suite as root to include these tests")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        pytest.skip("Slurm is not installed and apt-get is not available to install it")
    from zeroforge.pipeline.dist import free_port

    cluster_dir = tmp_path_factory.mktemp("slurm")
    # Own ports, so a Slurm already running on this machine (6817/6818) is left alone.
    ports = {"ZEROFORGE_SLURMCTLD_PORT": str(free_port()),
             "ZEROFORGE_SLURMD_PORT": str(free_port())}
    proc = subprocess.run(["bash", str(START), str(cluster_dir)], capture_output=True,
                          text=True, timeout=900, env={**os.environ, **ports})
    if proc.returncode != 0:
        pytest.fail(f"{START} failed:\n{proc.stdout}\n{proc.stderr}")
    conf = proc.stdout.strip().splitlines()[-1].removeprefix("SLURM_CONF=")
    try:
        yield {"SLURM_CONF": conf, "TORCH_EXTENSIONS_DIR": _torch_extensions_dir()}
    finally:
        subprocess.run(["bash", str(STOP), str(cluster_dir)], capture_output=True, timeout=120)


def _torch_extensions_dir() -> str:
    """Where the jobs find DeepSpeed's JIT-built op: the other e2e tests' directory (torch's
    default) when both use the same `ninja`, else a sibling of it.

    The jobs run with the venv's bin first on PATH, so they use the venv's ninja. When this
    pytest's PATH finds another ninja (e.g. Debian's 1.11 against pip's 1.13, which hash build
    commands differently), the two would rebuild the op over each other's build every time
    they alternate (30-60 s each); separate directories keep both builds."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.environ["TORCH_EXTENSIONS_DIR"]
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    cu = "cpu" if torch.version.cuda is None else "cu" + torch.version.cuda.replace(".", "")
    shared = os.path.join(get_default_build_root(),
                          f"py{sys.version_info.major}{sys.version_info.minor}_{cu}")
    venv_ninja = Path(sys.executable).parent / "ninja"
    if venv_ninja.exists() and shutil.which("ninja") != str(venv_ninja):
        return shared + "_venv-ninja"
    return shared


@pytest.fixture(scope="module")
def pydoc_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The token store the brief asks for: `zeroforge prep builtin:pydoc-topics ...`."""
    out = tmp_path_factory.mktemp("store") / "pydoc"
    proc = subprocess.run([sys.executable, "-m", "zeroforge.launch", "prep", "builtin:pydoc-topics",
                           "--out", str(out), "--val-fraction", "0.1", "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


# ----------------------------------------------------------------------------- helpers


def _overrides(store: Path, run_dir: Path, steps: int, **extra: object) -> list[str]:
    """gpt2-tiny-cpu shrunk further: a few seconds of steps on 2 CPU ranks."""
    base: dict[str, object] = {
        "data.store": store, "run_dir": run_dir, "data.seq_len": 32, "data.val_windows": 4,
        "train.max_steps": steps, "train.micro_batch_size": 2, "train.grad_accum": 1,
        "train.log_every": 1, "train.eval_every": 0, "train.sample_tokens": 0,
        "checkpoint.every": 1000, "tracking.backend": "none", "optim.warmup_steps": 2,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _zeroforge(args: list[str], env: dict[str, str], cwd: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "zeroforge.launch", *args], capture_output=True,
                          text=True, env={**os.environ, **env}, cwd=cwd, timeout=120)
    assert proc.returncode == 0, f"zeroforge {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _slurm(args: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **env},
                          timeout=60)
    assert proc.returncode == 0, f"{' '.join(args)}: {proc.stderr}"
    return proc.stdout


def job_info(job_id: int, env: dict[str, str]) -> dict[str, str]:
    """`scontrol show job -o` as a dict (finished jobs stay listed: MinJobAge=3600)."""
    line = _slurm(["scontrol", "show", "job", "-o", str(job_id)], env).splitlines()[0]
    return dict(re.findall(r"(\w+)=(\S*)", line))


def wait_for_job(job_id: int, env: dict[str, str], log: Path | None = None) -> dict[str, str]:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        info = job_info(job_id, env)
        if info["JobState"] in FINAL_STATES:
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", str(job_id)], env={**os.environ, **env}, check=False)
    raise AssertionError(f"job {job_id} not finished after {JOB_TIMEOUT_S}s: {info}\n"
                         + _tail(log))


def wait_for_step(run_dir: Path, step: int, job_id: int, env: dict[str, str]) -> None:
    path = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        if any(r.get("step", 0) >= step for r in read_metrics(path)):
            return
        if job_info(job_id, env)["JobState"] in FINAL_STATES:
            raise AssertionError(f"job {job_id} ended before step {step}")
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {JOB_TIMEOUT_S}s")


def _tail(path: Path | None, n: int = 6000) -> str:
    return path.read_text(errors="replace")[-n:] if path and path.exists() else ""


def _train_log(run_dir: Path, job_id: int) -> Path:
    return run_dir / "slurm" / f"zf-gpt2-tiny-cpu-{job_id}.out"


def _launch_train(tmp_path: Path, env: dict[str, str], overrides: list[str]) -> int:
    out = _zeroforge(["launch", "slurm", "--config", TINY, "--nodes", "1", "--gpus-per-node",
                      "2", "--cpu-only", "--torch-extensions-dir", env["TORCH_EXTENSIONS_DIR"],
                      *overrides], env, tmp_path)
    return int(out.split()[-1])


def _train_steps(records: list[dict]) -> list[int]:
    return [r["step"] for r in records if "train/loss" in r]


# ----------------------------------------------------------------------------- tests


def test_train_job_with_two_ranks_completes(slurm_env, pydoc_store, tmp_path):
    run_dir = tmp_path / "run"
    job = _launch_train(tmp_path, slurm_env, _overrides(pydoc_store, run_dir, 4))
    info = wait_for_job(job, slurm_env, _train_log(run_dir, job))
    log = _tail(_train_log(run_dir, job))
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert info["NumTasks"] == "2" and info["Restarts"] == "0"
    assert "2 ranks, master" in log and "world size 2" in log
    assert _train_steps(read_metrics(run_dir / "metrics.jsonl")) == [1, 2, 3, 4]
    assert (run_dir / "slurm" / "zf-gpt2-tiny-cpu.sbatch").is_file()


def test_usr1_checkpoints_requeues_and_resumes_in_one_mlflow_run(
        slurm_env, pydoc_store, tmp_path, mlflow_server):
    steps = 14
    experiment = f"slurm-requeue-{uuid.uuid4().hex[:8]}"
    run_dir = tmp_path / "run"
    env = {**slurm_env, **mlflow_server.env}  # the job inherits MLFLOW_TRACKING_URI
    job = _launch_train(tmp_path, env, _overrides(
        pydoc_store, run_dir, steps, **{"tracking.backend": "mlflow",
                                        "tracking.experiment": experiment,
                                        "tracking.system_metrics": "false"}))
    log_path = _train_log(run_dir, job)
    wait_for_step(run_dir, 3, job, env)
    # What Slurm does --signal seconds before the time limit: SIGUSR1 to every rank.
    _slurm(["scancel", "--signal=USR1", str(job)], env)
    info = wait_for_job(job, env, log_path)
    log = _tail(log_path, 20000)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log

    assert info["Restarts"] == "1", log
    assert f"ranks finished with exit code {EXIT_PREEMPTED}" in log
    assert "requeue 1 of 10" in log and "(restart 1)" in log and "resuming from" in log
    # The preemption checkpoint is where the second attempt started.
    preempted_at = int(re.search(r"checkpoint at step (\d+) saved", log).group(1))
    assert 3 <= preempted_at < steps
    assert f"resuming from {run_dir / 'checkpoints'}/step_{preempted_at:08d}" in log

    records = read_metrics(run_dir / "metrics.jsonl")
    assert _train_steps(records) == list(range(1, steps + 1)), "each step exactly once"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    assert runs[0].info.status == "FINISHED"
    history = client.get_metric_history(runs[0].info.run_id, "train/loss")
    assert sorted({m.step for m in history}) == list(range(1, steps + 1))


def _corpus(root: Path) -> list[str]:
    """Eight small text files (stdlib sources: real text, no download) as prep input."""
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    root.mkdir()
    for name in ("abc", "bisect", "colorsys", "copy", "fnmatch", "glob", "heapq", "keyword"):
        (root / f"{name}.txt").write_text((stdlib / f"{name}.py").read_text())
    return [str(root / "*.txt")]


def test_prep_job_array_equals_a_local_build(slurm_env, tmp_path):
    from zeroforge.data_prep.build import PrepOptions, build_store
    from zeroforge.data_prep.store import TokenStore

    inputs = _corpus(tmp_path / "corpus")
    local = tmp_path / "local"
    build_store(inputs, local, PrepOptions(tokenizer="gpt2", val_fraction=0.25,
                                           progress=False))
    out = _zeroforge(["launch", "slurm-prep", *inputs, "--out", str(tmp_path / "sharded"),
                      "--parts", "3", "--val-fraction", "0.25",
                      "--log-dir", str(tmp_path / "logs")], slurm_env, tmp_path)
    array_job, finalize_job = (int(x) for x in out.split())
    info = wait_for_job(finalize_job, slurm_env)
    logs = "\n".join(_tail(p) for p in sorted((tmp_path / "logs").glob("*.out")))
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), logs
    # One line per array task; the finalize job could only start after all three succeeded.
    tasks = _slurm(["scontrol", "show", "job", "-o", str(array_job)], slurm_env).splitlines()
    assert sorted(re.search(r"ArrayTaskId=(\d+)", t).group(1) for t in tasks) == ["0", "1", "2"]
    assert all("JobState=COMPLETED" in t for t in tasks), tasks

    a, b = TokenStore.open(local), TokenStore.open(tmp_path / "sharded")
    assert a.fingerprint == b.fingerprint
    for split in ("train", "val"):
        sa, sb = a.split(split), b.split(split)
        assert (sa.n_docs, sa.n_tokens) == (sb.n_docs, sb.n_tokens)
        assert (sa.tokens(0, sa.n_tokens) == sb.tokens(0, sb.n_tokens)).all()
        assert (sa.doc_offsets == sb.doc_offsets).all()
    inspect = [json.loads(_zeroforge(["inspect", str(p), "--json"], {}, tmp_path))
               for p in (local, tmp_path / "sharded")]
    for d in inspect:
        d.pop("path"), d.pop("size_bytes", None)
    assert inspect[0] == inspect[1]


def test_prep_job_array_writes_to_object_storage(slurm_env, s3_server, tmp_path):
    """The same array, with --out s3://: every task writes its part to the bucket of a real S3
    server, and the finalize job stitches them there; the tasks find the server and the
    credentials through the AWS_* variables they inherit from the submitting shell."""
    from zeroforge.data_prep.build import PrepOptions, build_store
    from zeroforge.data_prep.locations import open_storage
    from zeroforge.data_prep.store import TokenStore
    from zeroforge.data_prep.verify import verify_store

    inputs = _corpus(tmp_path / "corpus")
    local = tmp_path / "local"
    build_store(inputs, local, PrepOptions(tokenizer="gpt2", val_fraction=0.25,
                                           progress=False))
    env = {**slurm_env, **s3_server.env, "ZEROFORGE_CACHE_DIR": str(tmp_path / "cache")}
    url = s3_server.new_bucket() + "/sharded"
    out = _zeroforge(["launch", "slurm-prep", *inputs, "--out", url, "--parts", "3",
                      "--val-fraction", "0.25", "--log-dir", str(tmp_path / "logs")], env,
                     tmp_path)
    _array_job, finalize_job = (int(x) for x in out.split())
    info = wait_for_job(finalize_job, env)
    logs = "\n".join(_tail(p) for p in sorted((tmp_path / "logs").glob("*.out")))
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), logs
    old = {k: os.environ.get(k) for k in s3_server.env}
    os.environ.update(s3_server.env)
    try:
        a, b = TokenStore.open(local), TokenStore.open(url)
        assert a.fingerprint == b.fingerprint
        for split in ("train", "val"):
            sa, sb = a.split(split), b.split(split)
            assert (sa.tokens(0, sa.n_tokens) == sb.tokens(0, sb.n_tokens)).all()
            assert (sa.doc_offsets == sb.doc_offsets).all()
        assert verify_store(url) == []
        assert not [k for k in open_storage(url).list("") if k.startswith("parts/")]
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_time_and_mem_checks_agree_with_sbatch(slurm_env):
    """What `launch slurm` accepts, the real sbatch accepts (`--test-only`: nothing runs), and
    what sbatch refuses, `launch slurm` refuses; out-of-range fields, which sbatch normalizes,
    are refused by us on purpose (tests/launch/test_slurm_render.py)."""
    from tests.launch.test_slurm_render import MEM_BAD, MEM_OK, TIME_BAD, TIME_OK, TIME_OUT_OF_RANGE

    def sbatch_accepts(option: str) -> bool:
        p = subprocess.run(["sbatch", "--test-only", option, "--mem=1M" if "--time" in option
                            else "--time=1", "--wrap", "true"], capture_output=True, text=True,
                           env={**os.environ, **slurm_env}, timeout=60)
        return "Invalid" not in p.stderr

    for value in [*TIME_OK, *TIME_OUT_OF_RANGE]:
        assert sbatch_accepts(f"--time={value}"), value
    for value in TIME_BAD:
        assert not sbatch_accepts(f"--time={value}"), value
    for value in MEM_OK:
        assert sbatch_accepts(f"--mem={value}"), value
    for value in MEM_BAD:
        assert not sbatch_accepts(f"--mem={value}"), value
