"""launch/slurm.py without a Slurm cluster: node lists, rendezvous port, the rendered sbatch
scripts (content and `bash -n`), the CLI's dry runs and errors, and the batch script's requeue
decision. The real cluster runs are in tests/e2e/test_slurm.py.

Where a test needs `sbatch`, `srun` or `scontrol` it puts a small stand-in script first on PATH
(Slurm itself is not installed for unit tests); the stand-ins only record their arguments and
exit with a chosen code.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from zeroforge.launch import slurm
from zeroforge.launch.cli import main as zeroforge
from zeroforge.launch.commands.launch import LAUNCHERS, launcher_parser
from zeroforge.pipeline.dist import discover, expand_nodelist, first_slurm_host, master_port
from zeroforge.pipeline.errors import EXIT_PREEMPTED

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "gpt2-tiny-cpu.yaml")


# ----------------------------------------------------------------------------- node lists


@pytest.mark.parametrize("nodelist, hosts", [
    ("vm", ["vm"]),
    ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
    ("gpu[08-10],login1", ["gpu08", "gpu09", "gpu10", "login1"]),
    ("a1,b[2-3],c", ["a1", "b2", "b3", "c"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("node-[9-11].ib", ["node-9.ib", "node-10.ib", "node-11.ib"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["vm", "gpu[01-03,07]", "gpu[08-10],login1", "a1,b[2-3]"])
def test_same_master_as_rank_discovery(nodelist):
    """pipeline/dist.py picks the same master when MASTER_ADDR is unset (a bare srun)."""
    assert first_slurm_host(nodelist) == expand_nodelist(nodelist)[0]


@pytest.mark.parametrize("bad", ["", "gpu[1-", "gpu]1[", "gpu[3-1]", "gpu[a-b]"])
def test_expand_nodelist_rejects_malformed(bad):
    with pytest.raises(ValueError):
        expand_nodelist(bad)


def test_master_port_matches_rank_discovery():
    """The script exports MASTER_PORT; pipeline/dist.py derives the same one without it."""
    for job_id in (1, 19999, 20000, 123456789):
        env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1",
               "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "gpu[3-4]", "SLURM_JOB_ID": str(job_id)}
        d = discover(env)
        assert (d.source, d.rank, d.world_size, d.master_addr) == ("slurm", 1, 2, "gpu3")
        assert d.master_port == master_port(job_id)
        assert 20000 <= master_port(job_id) < 40000


def test_hostfile_from_nodelist():
    hosts = expand_nodelist("gpu[1-2]")
    assert slurm.hostfile(hosts, 8) == "gpu1 slots=8\ngpu2 slots=8\n"
    with pytest.raises(ValueError, match="slots"):
        slurm.hostfile(hosts, 0)


# ----------------------------------------------------------------------------- rendering


def test_render_fails_on_missing_or_unused_placeholders():
    assert slurm.render("a {{ x }} {{y}}", {"x": "1", "y": "2"}) == "a 1 2"
    with pytest.raises(AssertionError, match="missing"):
        slurm.render("{{x}} {{y}}", {"x": "1"})
    with pytest.raises(AssertionError, match="unused"):
        slurm.render("{{x}}", {"x": "1", "z": "2"})


def _train_job(**kw) -> slurm.TrainJob:
    sb = slurm.SbatchOptions(job_name="zf-test", output="/runs/a b/slurm/%x-%j.out",
                             chdir="/work", partition="gpu", time="1:00:00")
    base = dict(config="/cfg/run.yaml", overrides=["train.max_steps=10", "run_dir=/runs/a b"],
                nodes=2, ranks_per_node=4, gpus=True, sbatch=sb,
                torch_extensions_dir="/cache/torch ext", signal_grace_s=120, max_requeues=3,
                env={"MLFLOW_TRACKING_URI": "http://h:5000"})
    base.update(kw)
    return slurm.TrainJob(**base)


def _directives(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines()
            if line.startswith("#SBATCH ")]


def _bash_syntax_ok(script: str, tmp_path: Path) -> None:
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_train_script_gpu(tmp_path):
    script = slurm.render_train(_train_job(), "zeroforge launch slurm ...")
    d = _directives(script)
    for want in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--requeue",
                 "--open-mode=append", "--partition=gpu", "--time=1:00:00",
                 "--job-name=zf-test", "--chdir=/work",
                 '--output="/runs/a b/slurm/%x-%j.out"'):
        assert want in d, (want, d)
    # Every rank is signalled (no "B:", which would reach only the batch shell).
    assert "--signal=USR1@120" in d
    assert not any("gpus-per-task" in x for x in d)
    assert f"PYTHON={sys.executable}" in script
    assert f"export PATH={Path(sys.executable).parent}:" in script
    assert "export TORCH_EXTENSIONS_DIR='/cache/torch ext'" in script
    assert "export MLFLOW_TRACKING_URI=http://h:5000" in script
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in script
    assert "MASTER_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))" in script
    assert ('srun --nodes 2 --ntasks-per-node 4 --wait=60 --kill-on-bad-exit=0 "$PYTHON" -m '
            "zeroforge.launch train --config /cfg/run.yaml train.max_steps=10 'run_dir=/runs/a b'"
            ) in script
    assert f'if [ "$status" -eq {EXIT_PREEMPTED} ]' in script
    assert 'if [ "$restarts" -lt 3 ]' in script
    _bash_syntax_ok(script, tmp_path)


def test_train_script_cpu_only_requests_no_gpus(tmp_path):
    sb = slurm.SbatchOptions(job_name="cpu", output="o-%j.out", chdir="/w", cpus_per_task=3)
    script = slurm.render_train(_train_job(gpus=False, nodes=1, ranks_per_node=2, sbatch=sb),
                                "x")
    d = _directives(script)
    assert "--ntasks-per-node=2" in d and "--cpus-per-task=3" in d
    assert not any("gpu" in x for x in d)
    # srun of Slurm >= 22.05 does not inherit --cpus-per-task from the allocation.
    assert "srun --nodes 1 --ntasks-per-node 2 --wait=60 --kill-on-bad-exit=0 --cpus-per-task 3" \
        in script
    _bash_syntax_ok(script, tmp_path)


def test_train_job_problems_are_collected():
    sb = slurm.SbatchOptions(job_name="two words", output="o", chdir="/", extra=["exclusive"])
    job = _train_job(nodes=0, ranks_per_node=0, signal_grace_s=-1, max_requeues=-1, sbatch=sb,
                     env={"1BAD": "x"})
    with pytest.raises(slurm.LaunchError) as e:
        slurm.render_train(job, "x")
    for option in ("--nodes", "--gpus-per-node", "--signal-grace", "--max-requeues",
                   "--job-name", "--sbatch 'exclusive'", "--env '1BAD'"):
        assert option in str(e.value)


def test_prep_scripts(tmp_path):
    sb = slurm.SbatchOptions(job_name="zf-prep", output="/logs/%x-%A_%a.out", chdir="/w",
                             cpus_per_task=4, partition="cpu")
    job = slurm.PrepJob(inputs=["data/*.jsonl", "more dir"], store="/stores/s", parts=8,
                        prep_args=["--workers", "4", "--val-fraction", "0.1"], sbatch=sb,
                        finalize_output="/logs/%x-%j.out", max_concurrent=3)
    parts, finalize = slurm.render_prep(job, "cmd")
    d = _directives(parts)
    assert "--array=0-7%3" in d and "--ntasks=1" in d and "--cpus-per-task=4" in d
    # The glob reaches prep unexpanded (prep sorts its matches itself).
    assert ("prep 'data/*.jsonl' 'more dir' --out /stores/s --num-parts 8 --workers 4 "
            '--val-fraction 0.1 --part "$SLURM_ARRAY_TASK_ID"') in parts
    f = _directives(finalize)
    assert "--job-name=zf-prep-finalize" in f and "--output=/logs/%x-%j.out" in f
    assert "--partition=cpu" in f and not any("cpus-per-task" in x for x in f)
    assert "prep --finalize /stores/s" in finalize
    _bash_syntax_ok(parts, tmp_path)
    _bash_syntax_ok(finalize, tmp_path)


def test_templates_ship_with_the_package():
    for name in ("train.sbatch.tmpl", "prep-parts.sbatch.tmpl", "prep-finalize.sbatch.tmpl"):
        assert slurm.load_template(name).startswith("#!/bin/bash\n")


# ----------------------------------------------------------------------------- CLI


def test_launch_dispatches_lazily():
    assert set(LAUNCHERS) == {"slurm", "slurm-prep", "deepspeed"}
    parser, run = launcher_parser("slurm")
    assert run is slurm.run_train
    assert parser.parse_args(["--config", "x", "a=1"]).overrides == ["a=1"]


def test_cli_dry_run_prints_the_script(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = zeroforge(["launch", "slurm", "--config", TINY, "--nodes", "1", "--gpus-per-node",
                      "2", "--cpu-only", "--dry-run", f"run_dir={tmp_path / 'run'}",
                      "train.max_steps=7", "--sbatch=--exclusive"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("#!/bin/bash\n")
    assert f"--output={tmp_path / 'run' / 'slurm' / '%x-%j.out'}" in _directives(out)
    assert "--exclusive" in _directives(out)
    assert f"-m zeroforge.launch train --config {TINY} run_dir={tmp_path / 'run'} train.max_steps=7" \
        in out
    assert not (tmp_path / "run").exists(), "a dry run writes nothing"


def test_cli_bad_config_fails_before_submitting(capsys):
    code = zeroforge(["launch", "slurm", "--config", TINY, "--dry-run", "train.max_stepz=3"])
    err = capsys.readouterr().err
    assert code == 2
    assert "train.max_stepz" in err and "error" in err


def test_cli_bad_options_are_named(capsys):
    code = zeroforge(["launch", "slurm", "--config", TINY, "--dry-run", "--nodes", "0",
                      "--max-requeues", "-1"])
    err = capsys.readouterr().err
    assert code == 2 and "--nodes" in err and "--max-requeues" in err


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_cli_submits_with_sbatch(capsys, tmp_path, monkeypatch):
    """`sbatch --parsable` output (job id, optionally ";cluster") becomes the printed job id and
    the script is kept in RUN_DIR/slurm/. sbatch is a stand-in here (see module doc)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "sbatch", f'echo "$@" > {tmp_path}/sbatch.args\necho "4242;cluster1"\n')
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    code = zeroforge(["launch", "slurm", "--config", TINY, "--cpu-only", "--gpus-per-node", "2",
                      f"run_dir={run_dir}"])
    assert code == 0
    assert capsys.readouterr().out.strip() == "4242"
    script = run_dir / "slurm" / "zf-gpt2-tiny-cpu.sbatch"
    assert (tmp_path / "sbatch.args").read_text().split() == ["--parsable", str(script)]
    assert script.read_text().startswith("#!/bin/bash\n")


def test_cli_reports_sbatch_failure(capsys, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "sbatch", 'echo "sbatch: error: invalid partition specified: nope" >&2\n'
                             "exit 1\n")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    code = zeroforge(["launch", "slurm", "--config", TINY, "--partition", "nope",
                      f"run_dir={tmp_path / 'run'}"])
    assert code == 1
    assert "invalid partition specified: nope" in capsys.readouterr().err


def test_cli_prep_dry_run(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for i in range(3):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i}\n")
    code = zeroforge(["launch", "slurm-prep", "doc0.txt", "doc1.txt", "doc2.txt", "--out",
                      "store", "--parts", "3", "--val-fraction", "0.1", "--workers", "2",
                      "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    assert "#SBATCH --array=0-2" in out and "#SBATCH --cpus-per-task=2" in out
    assert (f"prep doc0.txt doc1.txt doc2.txt --out {tmp_path / 'store'} --num-parts 3 "
            "--workers 2 --val-fraction 0.1 --part") in out
    assert f"prep --finalize {tmp_path / 'store'}" in out
    assert "--dependency=afterok:ARRAY_JOB_ID --kill-on-invalid-dep=yes" in out
    assert "--tokenizer" not in out, "prep defaults are left to prep"


def test_cli_prep_errors(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = zeroforge(["launch", "slurm-prep", "missing.txt", "--out", "s", "--parts", "2",
                      "--dry-run"])
    assert code == 2 and "missing.txt" in capsys.readouterr().err
    (tmp_path / "a.txt").write_text("a\n")
    code = zeroforge(["launch", "slurm-prep", "a.txt", "--out", "s", "--parts", "2",
                      "--num-parts", "4", "--dry-run"])
    assert code == 2 and "--num-parts is set by slurm-prep" in capsys.readouterr().err


# ----------------------------------------------------------------------------- requeue logic


@pytest.fixture
def run_batch_script(tmp_path):
    """Run the rendered training script under bash with stand-ins for srun and scontrol: srun
    exits with the given code, scontrol records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    _stub(bin_dir, "srun", 'exit "$FAKE_SRUN_EXIT"\n')
    _stub(bin_dir, "scontrol", f'echo "$@" >> {calls}\n'
                               '[ "$1 $2" = "show hostnames" ] && echo node1 && echo node2\n'
                               "exit 0\n")
    sb = slurm.SbatchOptions(job_name="t", output="o", chdir=str(tmp_path))
    script = tmp_path / "job.sbatch"
    script.write_text(slurm.render_train(_train_job(sbatch=sb, max_requeues=2), "x"))

    def run(srun_exit: int, restarts: int | None) -> tuple[int, str, list[str]]:
        calls.unlink(missing_ok=True)
        env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "77",
               "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NTASKS": "8",
               "FAKE_SRUN_EXIT": str(srun_exit)}
        if restarts is not None:
            env["SLURM_RESTART_COUNT"] = str(restarts)
        proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
        lines = calls.read_text().splitlines() if calls.exists() else []
        return proc.returncode, proc.stdout, lines

    return run


def test_preempted_job_requeues_itself(run_batch_script):
    code, out, calls = run_batch_script(EXIT_PREEMPTED, None)
    assert code == 0
    assert calls == ["show hostnames node[1-2]", "requeue 77"]
    assert "master node1:20077" in out and "requeue 1 of 2" in out


def test_requeue_cap(run_batch_script):
    code, out, calls = run_batch_script(EXIT_PREEMPTED, 1)
    assert code == 0 and calls[-1] == "requeue 77"
    code, out, calls = run_batch_script(EXIT_PREEMPTED, 2)
    assert code == EXIT_PREEMPTED, "the cap reached: the job fails with the preemption code"
    assert "requeue 77" not in calls and "--max-requeues" in out


@pytest.mark.parametrize("srun_exit", [0, 1, 2])
def test_other_exits_pass_through(run_batch_script, srun_exit):
    code, _, calls = run_batch_script(srun_exit, 0)
    assert code == srun_exit and "requeue 77" not in calls


# Accepted by sbatch (checked against a real one in tests/e2e/test_slurm.py) and by us.
TIME_OK = {"10": 600, "10:30": 630, "1:00:00": 3600, "24:00:00": 86400, "61": 3660,
           "2-00:00:00": 172800, "2-5": 190800, "1-23:59:59": 172799, "00:01:00": 60,
           "0": None, "0:0": None, "UNLIMITED": None, "infinite": None}
# Refused by sbatch ("Invalid --time specification").
TIME_BAD = ["banana", "1:2:3:4", " 5", "1-2-3", "10:", "1h"]
# Accepted by sbatch, which normalizes them (25:99:99 = 26:40:39), refused by us as typos.
TIME_OUT_OF_RANGE = ["25:99:99", "1:60", "5:60", "1:59:60", "1-24", "1-24:00:00"]
MEM_OK = ["100", "100M", "1G", "1g", "10MB", "1GB", "0", "1K", "200G"]
MEM_BAD = ["lots", "1.5G", "-1", "1 G"]


@pytest.mark.parametrize("text", sorted(TIME_OK))
def test_time_limits_read_as_sbatch_reads_them(text):
    assert slurm.time_limit_seconds(text) == TIME_OK[text]


@pytest.mark.parametrize("text", TIME_BAD + TIME_OUT_OF_RANGE)
def test_bad_time_limits_are_refused_naming_the_flag(text):
    with pytest.raises(ValueError, match=r"--time '.*'"):
        slurm.time_limit_seconds(text)


@pytest.mark.parametrize("mem,ok", [(m, True) for m in MEM_OK] + [(m, False) for m in MEM_BAD])
def test_mem_values(mem, ok, tmp_path):
    opts = slurm.SbatchOptions(job_name="j", output="o", chdir=str(tmp_path), mem=mem)
    assert (opts.problems() == []) == ok
    if not ok:
        assert opts.problems()[0].startswith(f"--mem {mem!r}:")


def test_signal_grace_beyond_the_time_limit_warns(tmp_path):
    def job(time, grace):
        return slurm.TrainJob(config="c", overrides=[], nodes=1, ranks_per_node=1, gpus=False,
                              sbatch=slurm.SbatchOptions(job_name="j", output="o",
                                                         chdir=str(tmp_path), time=time),
                              torch_extensions_dir="t", signal_grace_s=grace)
    (warning,) = job("00:01:00", 300).warnings()
    assert "--signal-grace 300 s is not shorter than --time 00:01:00 (60 s)" in warning
    assert job("00:10:00", 300).warnings() == []
    assert job(None, 300).warnings() == [] and job("UNLIMITED", 300).warnings() == []
