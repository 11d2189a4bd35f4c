"""launch/hostfile.py without network namespaces: hostfile parsing, the environment the ranks
get, the runner command, and one launch through the real DeepSpeed runner and launcher.

That launch swaps pdsh for a stand-in that runs each "remote" command in a fresh `bash -c` with
an empty environment, as a non-interactive ssh login would: it needs neither root nor sshd, and
checks that what we write to $DS_ENV_FILE survives DeepSpeed's file reading, its quoting and a
remote shell. tests/e2e/test_two_nodes.py does the same with real pdsh, ssh and two nodes.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from pathlib import Path

import pytest
from zeroforge.launch import hostfile as hf
from zeroforge.launch.cli import main

REPO = Path(__file__).resolve().parents[2]


def parse_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    hf.add_arguments(parser)
    return parser.parse_args(list(argv))


# ----------------------------------------------------------------------------- hostfile


def test_parse_hostfile_accepts_comments_and_blank_lines():
    text = "# cluster\n\nnode-a slots=8\n  node-b slots=4   # spare\n10.0.0.3 slots=1\n"
    assert hf.parse_hostfile(text) == [
        hf.HostSlots("node-a", 8), hf.HostSlots("node-b", 4), hf.HostSlots("10.0.0.3", 1)]


def test_parse_hostfile_reports_every_bad_line_with_its_number():
    text = "node-a slots=2\nnode-b\nnode-c slots=0\nnode-a slots=1\nnode-d slots=x\n"
    with pytest.raises(ValueError) as e:
        hf.parse_hostfile(text, "hosts.txt")
    lines = str(e.value).splitlines()
    assert lines == [
        "hosts.txt:2: expected 'HOST slots=N', got 'node-b'",
        "hosts.txt:3: node-c has slots=0; it must be at least 1",
        "hosts.txt:4: node-a is listed again (first on line 1)",
        "hosts.txt:5: expected 'HOST slots=N', got 'node-d slots=x'",
    ]


def test_empty_or_missing_hostfile(tmp_path):
    with pytest.raises(ValueError, match="hosts: no hosts"):
        hf.parse_hostfile("# nothing\n\n", "hosts")
    with pytest.raises(ValueError, match="--hostfile: .* is not a file"):
        hf.read_hostfile(tmp_path / "absent")


# ----------------------------------------------------------------------------- environment


def test_forwarded_variables(tmp_path):
    environ = {"GLOO_SOCKET_IFNAME": "eth1", "NCCL_SOCKET_IFNAME": "ib0",
               "TORCH_EXTENSIONS_DIR": "/cache/ext", "MLFLOW_TRACKING_URI": "http://mlf:5000",
               "ZEROFORGE_DEBUG_CHECKSUM": "1", "OMP_NUM_THREADS": "4", "PYTHONPATH": "/extra",
               "DEEPSPEED_TIMEOUT": "5", "AWS_ENDPOINT_URL": "http://s3:9000",
               "AWS_PROFILE": "lab", "AWS_SECRET_ACCESS_KEY": "k", "AWS_ACCESS_KEY_ID": "i",
               "HOME": "/root", "SECRET_TOKEN": "x", "CUDA_VISIBLE_DEVICES": "0",
               "MASTER_ADDR": "1.2.3.4"}
    env = hf.resolve_environment(environ, "/work/repo", "/venv/bin/python", str(tmp_path))
    assert env["PATH"] == "/venv/bin:$PATH"  # expanded by the remote shell
    assert env["PYTHONPATH"] == "/work/repo:/extra"  # launch dir first, as the runner does
    for key in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "TORCH_EXTENSIONS_DIR",
                "MLFLOW_TRACKING_URI", "ZEROFORGE_DEBUG_CHECKSUM", "OMP_NUM_THREADS",
                "DEEPSPEED_TIMEOUT", "AWS_ENDPOINT_URL", "AWS_PROFILE"):
        assert env[key] == environ[key], key
    # Per-process or launcher-owned values, and secrets, are not forwarded.
    for key in ("HOME", "SECRET_TOKEN", "CUDA_VISIBLE_DEVICES", "MASTER_ADDR",
                "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"):
        assert key not in env, key


def test_user_env_file_and_env_flags_win_in_order(tmp_path):
    home, cwd = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    cwd.mkdir()
    (home / ".deepspeed_env").write_text("# site settings\nNCCL_IB_DISABLE=1\n\nGLOO_SOCKET_IFNAME=eth9\n")
    (cwd / ".deepspeed_env").write_text("NCCL_IB_DISABLE=0\n")
    env = hf.resolve_environment({"GLOO_SOCKET_IFNAME": "eth1"}, str(cwd), "/v/bin/python",
                                 str(home), extra=["GLOO_SOCKET_IFNAME=eth2", "NEW=a b"])
    assert env["NCCL_IB_DISABLE"] == "0"  # ./.deepspeed_env after ~/.deepspeed_env
    assert env["GLOO_SOCKET_IFNAME"] == "eth2"  # --env last
    assert env["NEW"] == "a b"


def test_ds_env_file_name_is_honoured(tmp_path):
    custom = tmp_path / "site.env"
    custom.write_text("NCCL_DEBUG=INFO\n")
    env = hf.resolve_environment({"DS_ENV_FILE": str(custom)}, str(tmp_path), "/v/bin/python",
                                 str(tmp_path))
    assert env["NCCL_DEBUG"] == "INFO"


def test_bad_environment_is_reported_once_naming_each_variable(tmp_path):
    (tmp_path / ".deepspeed_env").write_text("GOOD=1\nno equals sign\n")
    with pytest.raises(ValueError) as e:
        hf.resolve_environment({}, str(tmp_path), "/v/bin/python", str(tmp_path))
    assert f"{tmp_path / '.deepspeed_env'}:2: expected KEY=VALUE" in str(e.value)
    (tmp_path / ".deepspeed_env").unlink()
    environ = {"MLFLOW_TRACKING_PASSWORD": 'pa"ss', "ZEROFORGE_X": "$HOME"}
    with pytest.raises(ValueError) as e:
        hf.resolve_environment(environ, str(tmp_path), "/v/bin/python", str(tmp_path),
                               extra=["1BAD=x", "TORCH_Y=a`b`"])
    msg = str(e.value)
    assert "--env '1BAD=x': expected KEY=VALUE" in msg
    for key in ("MLFLOW_TRACKING_PASSWORD", "ZEROFORGE_X", "TORCH_Y"):
        assert f"environment variable {key} contains" in msg, key


def test_render_env_file_is_what_deepspeed_parses():
    env = {"PATH": "/v/bin:$PATH", "GLOO_SOCKET_IFNAME": "eth1", "URI": "sqlite:///a=b.db"}
    text = hf.render_env_file(env)
    # The runner's loop: every line is `key, val = line.split("=", maxsplit=1)`.
    parsed = dict(line.split("=", maxsplit=1) for line in text.splitlines(keepends=True))
    assert {k.strip(): v.strip() for k, v in parsed.items()} == env


# ----------------------------------------------------------------------------- command / plan


def test_plan_and_command(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("node1 slots=2\nnode2 slots=2\n")
    ssh_conf = tmp_path / "ssh_config"
    ssh_conf.write_text("Host *\n  BatchMode yes\n")
    args = parse_args("--hostfile", str(hosts), "--config", "gpt2-tiny-cpu",
                      "train.max_steps=5", "tracking.run_name=two words",
                      "--ssh-config", str(ssh_conf), "--master-port", "29600")
    p = hf.plan(args, environ={"PDSH_SSH_ARGS_APPEND": "-q"}, cwd=str(tmp_path),
                home=str(tmp_path))
    assert [h.host for h in p.hosts] == ["node1", "node2"] and not p.local
    assert p.runner_env == {"PDSH_RCMD_TYPE": "ssh",
                            "PDSH_SSH_ARGS_APPEND": f"-q -F {ssh_conf.resolve()}"}
    cmd = p.command("10.0.0.1")
    assert cmd[:4] == [sys.executable, "-u", "-m", "deepspeed.launcher.runner"]
    assert cmd[cmd.index("--hostfile") + 1] == str(hosts.resolve())
    assert cmd[cmd.index("--master_addr") + 1] == "10.0.0.1"
    assert cmd[cmd.index("--master_port") + 1] == "29600"
    assert "--no_ssh_check" in cmd and "--force_multi" not in cmd
    assert cmd[cmd.index("--module"):] == [
        "--module", "zeroforge.launch", "train", "--config", "gpt2-tiny-cpu", "train.max_steps=5",
        "tracking.run_name=two words"]


def test_single_host_plans(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("gpu-box slots=8\n")
    p = hf.plan(parse_args("--hostfile", str(hosts), "--config", "x"), environ={})
    assert "--force_multi" in p.command("10.0.0.5")  # still started over ssh on gpu-box
    hosts.write_text("localhost slots=2\n")
    p = hf.plan(parse_args("--hostfile", str(hosts), "--config", "x"), environ={})
    cmd = p.command(None)
    assert p.local and "--force_multi" not in cmd
    assert cmd[cmd.index("--master_addr") + 1] == "127.0.0.1"


def test_plan_collects_every_problem(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("node1 slots=two\n")
    args = parse_args("--hostfile", str(hosts), "--config", "x", "a=1;reboot",
                      "--ssh-config", str(tmp_path / "nope"), "--master-port", "70000",
                      "--env", "K=$(id)")
    with pytest.raises(ValueError) as e:
        hf.plan(args, environ={}, cwd=str(tmp_path), home=str(tmp_path))
    msg = str(e.value)
    for part in (f"{hosts}:1: expected 'HOST slots=N'", "environment variable K contains",
                 "argument 'a=1;reboot' contains ';'", "--ssh-config:", "--master-port: 70000"):
        assert part in msg, part


def test_launch_directory_must_be_a_plain_path(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("node1 slots=1\n")
    with pytest.raises(ValueError, match="the launch directory '/a b' has spaces"):
        hf.plan(parse_args("--hostfile", str(hosts), "--config", "x"), environ={}, cwd="/a b")


def test_unsafe_arguments():
    assert hf._unsafe_arg("train.sample_prompts=[a,b]") is not None  # a glob when bare
    assert hf._unsafe_arg("tracking.run_name=my run [2]") is None  # double-quoted by pdsh
    assert hf._unsafe_arg("optim.lr=3e-4") is None
    assert hf._unsafe_arg("data.store=/data/a b/$x") is not None


def test_cli_dry_run_prints_command_and_environment(tmp_path, capsys, monkeypatch):
    hosts = tmp_path / "hosts"
    hosts.write_text("node1 slots=1\nnode2 slots=1\n")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth7")
    monkeypatch.delenv("DS_ENV_FILE", raising=False)
    code = hf.run(parse_args("--hostfile", str(hosts), "--config", "gpt2-tiny-cpu",
                             "train.max_steps=3", "--dry-run"))
    out = capsys.readouterr().out
    assert code == 0
    assert "GLOO_SOCKET_IFNAME=eth7\n" in out and f"PATH={Path(sys.executable).parent}:$PATH" in out
    assert "deepspeed.launcher.runner" in out and "--module zeroforge.launch train" in out
    assert "train.max_steps=3" in out


def test_cli_rejects_a_bad_config_key_before_contacting_hosts(tmp_path, capsys):
    hosts = tmp_path / "hosts"
    hosts.write_text("unreachable.invalid slots=1\n")
    code = main(["launch", "deepspeed", "--hostfile", str(hosts), "--config", "gpt2-tiny-cpu",
                 "train.max_stepz=3"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("zeroforge launch: error:") and "train.max_stepz" in err


# ----------------------------------------------------------------------------- real runner

FAKE_PDSH = r"""#!/bin/bash
# Stand-in for pdsh: run the command once per host, in a fresh shell with an empty environment
# (like a non-interactive ssh login); %n is the host's index, as pdsh substitutes it.
while [ $# -gt 0 ]; do
  case "$1" in
    -S) shift ;;
    -f) shift 2 ;;
    -w) hosts="$2"; shift 2 ;;
    *) break ;;
  esac
done
cmd="$*"; rc=0; i=0; pids=()
IFS=, read -ra list <<< "$hosts"
for h in "${list[@]}"; do
  env -i HOME="$HOME" PATH=/usr/bin:/bin bash -c "${cmd//%n/$i}" &
  pids+=($!)
  i=$((i + 1))
done
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""

PROBE = """import json, os, sys
keys = ["PATH", "PYTHONPATH", "GLOO_SOCKET_IFNAME", "MLFLOW_TRACKING_URI", "ZEROFORGE_NOTE",
        "SITE_VAR", "NOT_FORWARDED", "RANK", "WORLD_SIZE", "MASTER_ADDR"]
with open(f"probe_rank{os.environ['RANK']}.json", "w") as f:
    json.dump({"env": {k: os.environ.get(k) for k in keys}, "argv": sys.argv[1:],
               "cwd": os.getcwd()}, f)
"""


def test_environment_reaches_ranks_through_the_real_deepspeed_runner(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    pdsh = bin_dir / "pdsh"
    pdsh.write_text(FAKE_PDSH)
    pdsh.chmod(pdsh.stat().st_mode | stat.S_IEXEC)
    work = tmp_path / "work"
    work.mkdir()
    (work / "zf_env_probe.py").write_text(PROBE)
    (work / ".deepspeed_env").write_text("SITE_VAR=from the site file\n")
    hosts = work / "hosts"
    hosts.write_text("nodeA slots=1\nnodeB slots=1\n")
    monkeypatch.chdir(work)
    monkeypatch.delenv("DS_ENV_FILE", raising=False)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth-test")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/x y/mlflow.db")
    monkeypatch.setenv("ZEROFORGE_NOTE", "a=b,c:d@e%f+g")
    monkeypatch.setenv("NOT_FORWARDED", "1")
    args = parse_args("--hostfile", str(hosts), "--config", "cfg.yaml", "k=v w",
                      "--env", "ZEROFORGE_NOTE=a=b,c:d@e%f+g")
    p = hf.plan(args)
    p.module = "zf_env_probe"
    assert hf.launch(p, p.command("10.9.8.7")) == 0
    runs = [json.loads((work / f"probe_rank{r}.json").read_text()) for r in (0, 1)]
    venv_bin = str(Path(sys.executable).parent)
    for rank, got in enumerate(runs):
        env = got["env"]
        assert env["RANK"] == str(rank) and env["WORLD_SIZE"] == "2"
        assert env["MASTER_ADDR"] == "10.9.8.7"
        assert env["PATH"] == f"{venv_bin}:/usr/bin:/bin"  # the venv, then the node's PATH
        assert env["PYTHONPATH"].split(":")[0] == str(work)
        assert env["GLOO_SOCKET_IFNAME"] == "eth-test"
        assert env["MLFLOW_TRACKING_URI"] == "sqlite:////tmp/x y/mlflow.db"
        assert env["ZEROFORGE_NOTE"] == "a=b,c:d@e%f+g"
        assert env["SITE_VAR"] == "from the site file"
        assert env["NOT_FORWARDED"] is None
        assert got["cwd"] == str(work)
        assert got["argv"] == ["--local_rank=0", "train", "--config", "cfg.yaml", "k=v w"]
