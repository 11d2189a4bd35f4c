"""The `zeroforge prep|inspect|verify` command lines through the real entry points."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import REPO, TINY_CLI, store_digest, zeroforge_cmd, zf_subprocess


@pytest.mark.parametrize("command", ["prep", "inspect", "verify"])
def test_help_through_the_console_script(command):
    r = zf_subprocess(command, "--help")
    assert r.returncode == 0, r.stderr
    assert f"usage: zeroforge {command}" in r.stdout
    assert "Traceback" not in r.stderr


def test_help_through_python_dash_m():
    r = subprocess.run(
        [sys.executable, "-m", "zeroforge.launch", "prep", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    for flag in (
        "--out",
        "--val-fraction",
        "--text-mode",
        "--strict",
        "--num-parts",
        "--part",
        "--finalize",
        "--commit-seconds",
        "--workers",
        "--codec",
        "--streaming",
        "--overwrite",
    ):
        assert flag in r.stdout, flag
    assert "builtin:pydoc-topics" in r.stdout  # the epilog lists the input kinds


def test_top_level_help_lists_the_data_commands():
    r = zf_subprocess("--help")
    assert r.returncode == 0
    for command in ("prep", "inspect", "verify"):
        assert command in r.stdout


def test_console_script_is_installed():
    assert zeroforge_cmd()[0].endswith("zeroforge"), (
        "the `zeroforge` console script is not installed"
    )


def test_prep_inspect_verify_end_to_end(corpus, tmp_path):
    """The real console script: build, rerun (a no-op that says so), inspect, verify."""
    out = tmp_path / "s"
    args = [
        "prep",
        corpus.root,
        "--out",
        out,
        "--val-fraction",
        "0.2",
        "--text-mode",
        "paragraph",
        *TINY_CLI,
    ]
    r = zf_subprocess(*args)
    assert r.returncode == 0, r.stderr
    assert "done" in r.stderr and "train: " in r.stderr
    digest = store_digest(out)
    r = zf_subprocess(*args)
    assert r.returncode == 0 and "already complete" in r.stderr and "nothing to do" in r.stderr, (
        r.stderr
    )
    assert store_digest(out) == digest
    r = zf_subprocess("inspect", out, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["splits"]["train"]["docs"] + info["splits"]["val"]["docs"] == len(corpus.docs)
    r = zf_subprocess("verify", out)
    assert r.returncode == 0 and r.stdout.strip() == f"OK {out}"


def test_argparse_errors_exit_2(zf, tmp_path):
    r = zf("prep", "x", "--out", tmp_path / "s", "--text-mode", "sentence")
    assert r.rc == 2 and "invalid choice" in r.err
    r = zf("verify")
    assert r.rc == 2 and "PATH" in r.err
