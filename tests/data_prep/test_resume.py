"""Interrupted builds: SIGKILL at random points, rerun, and the store is byte-identical to a clean
build. Also the deterministic resume paths (a build stopped by --strict, then rerun without it).
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from zeroforge.data_prep.build import PrepError, build_store
from zeroforge.data_prep.store import StoreError, TokenStore
from zeroforge.launch.commands.prep import add_arguments, options_from_args

from .conftest import REPO, TINY_CLI, opts, store_digest, store_files, zeroforge_cmd


def _generated_jsonl_corpus(
    root: Path, n_files: int = 4, mb_per_file: float = 1.05, seed: int = 11
) -> Path:
    """~4 MB of JSONL in several files: a few seconds of tokenizing, 4+ batches of ~1 MB, so a
    build with --commit-seconds 0 commits several times before it ends."""
    rng = random.Random(seed)
    vocab = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        for _ in range(3000)
    ]
    root.mkdir(parents=True)
    for f in range(n_files):
        lines, size = [], 0
        while size < mb_per_file * 1e6:
            line = json.dumps({"text": " ".join(rng.choices(vocab, k=rng.randint(20, 400)))}) + "\n"
            lines.append(line)
            size += len(line)
        (root / f"part-{f}.jsonl").write_text("".join(lines))
    return root


@pytest.fixture(scope="module")
def kill_setup(tmp_path_factory):
    """The corpus, the prep arguments, and a clean (uninterrupted) build to compare against."""
    root = tmp_path_factory.mktemp("kill")
    corpus = _generated_jsonl_corpus(root / "corpus")
    args = [str(corpus), "--val-fraction", "0.1", "--commit-seconds", "0", *TINY_CLI]
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    parsed = parser.parse_args([*args, "--out", str(root / "clean")])
    # The clean build runs in-process with the very options the command line produces.
    build_store(parsed.inputs, parsed.out, options_from_args(parsed))
    return root, args, store_digest(root / "clean")


def _ledger_commit(out: Path) -> int:
    try:
        return json.loads((out / "_build" / "ledger.json").read_text())["commit"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return -1


def _start(args: list[str], out: Path, log_path: Path) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [*zeroforge_cmd(), "prep", *args, "--out", str(out)],
            cwd=REPO,
            stdout=log,
            stderr=log,
            start_new_session=True,  # its own process group: the kill takes its workers too
        )


def _kill_after_commit(p: subprocess.Popen, out: Path, after: int, delay: float) -> bool:
    """SIGKILL the build `delay` seconds after it committed past `after`. False if it ended first."""
    while p.poll() is None and _ledger_commit(out) <= after:
        time.sleep(0.01)
    time.sleep(delay)
    if p.poll() is not None:
        return False
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    return True


def test_sigkill_at_random_points_then_rerun_gives_the_clean_store(kill_setup):
    root, args, clean = kill_setup
    rng = random.Random(20240607)
    resumed = killed = 0
    # (workers, kills): each kill waits for a new commit, then a random extra delay.
    trials = [(1, 1), (2, 1), (1, 2)]
    for t, (workers, n_kills) in enumerate(trials):
        out, log_path = root / f"trial{t}", root / f"trial{t}.log"
        trial_args = [*args, "--workers", str(workers)]
        for _ in range(n_kills):
            p = _start(trial_args, out, log_path)
            # After a real commit (>= 1), so that the rerun has something to resume from.
            if _kill_after_commit(p, out, max(_ledger_commit(out), 0), rng.uniform(0.0, 1.0)):
                killed += 1
                # What the kill left must never read as a store.
                with pytest.raises(StoreError):
                    TokenStore.open(out)
        p = _start(trial_args, out, log_path)
        assert p.wait(timeout=120) == 0, log_path.read_text()[-3000:]
        log = log_path.read_text()
        resumed += log.count("resuming")
        assert not (out / "_build").exists()
        assert store_files(out) == store_files(root / "clean"), f"trial {t}: {log[-2000:]}"
        assert store_digest(out) == clean, f"trial {t} differs from the clean build"
    assert killed >= 2 and resumed >= 1, f"{killed} kills, {resumed} resumes: tune the corpus size"


def test_sigkill_at_a_random_early_moment(kill_setup):
    """Killed at an arbitrary moment, possibly before the first commit (then it starts over)."""
    root, args, clean = kill_setup
    rng = random.Random(7)
    out, log_path = root / "early", root / "early.log"
    p = _start(args, out, log_path)
    try:
        p.wait(timeout=rng.uniform(0.3, 2.5))
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    p = _start(args, out, log_path)
    assert p.wait(timeout=120) == 0, log_path.read_text()[-3000:]
    assert store_digest(out) == clean


# --- deterministic interruptions ----------------------------------------------------------------------
def _corpus_with_bad_record_late(root: Path) -> Path:
    root.mkdir()
    rng = random.Random(3)
    for f in range(3):
        rows = [
            json.dumps({"text": f"file {f} row {i} " + "word " * rng.randint(5, 80)})
            for i in range(150)
        ]
        if f == 2:
            rows[100] = '{"text": broken json'
        (root / f"f{f}.jsonl").write_text("\n".join(rows) + "\n")
    return root


def test_build_stopped_by_strict_resumes_to_the_clean_store(tmp_path, caplog):
    """--strict stops at the bad record after several commits; the same build without
    --strict (the configuration hash ignores it) resumes from the last commit."""
    corpus = _corpus_with_bad_record_late(tmp_path / "c")
    common = {"val_fraction": 0.2, "batch_chars": 3000, "commit_seconds": 0}
    build_store([str(corpus)], tmp_path / "clean", opts(**common))
    out = tmp_path / "s"
    with pytest.raises(PrepError, match=r"f2.jsonl:101: malformed JSON"):
        build_store([str(corpus)], out, opts(strict=True, **common))
    assert json.loads((out / "_build" / "ledger.json").read_text())["commit"] > 3
    with pytest.raises(StoreError, match="did not complete"):
        TokenStore.open(out)
    with caplog.at_level(logging.INFO, logger="zeroforge.data_prep"):
        build_store([str(corpus)], out, opts(workers=2, **common))
    assert "resuming" in caplog.text
    assert store_digest(out) == store_digest(tmp_path / "clean")


@pytest.mark.parametrize(
    "leftover",
    [
        "train/tokens/c/{next}.{uuid}.partial",
        "val/doc_offsets/zarr.{uuid}.partial",
        "zarr.{uuid}.partial",
    ],
    ids=["shard", "array-metadata", "root-metadata"],
)
def test_resume_removes_what_a_kill_mid_write_leaves_behind(tmp_path, leftover):
    """zarr writes every file (shards, and zarr.json on each resize or attribute update) as
    NAME.<uuid>.partial and renames it; a SIGKILL during the write leaves that temporary file
    (the kill test saw both train/tokens/c/144.<hex>.partial and val/doc_offsets/zarr.<hex>.partial).
    The resumed build must not keep it: the finished store equals a clean build, file for file."""
    corpus = _corpus_with_bad_record_late(tmp_path / "c")
    common = {"val_fraction": 0.2, "batch_chars": 3000, "commit_seconds": 0}
    build_store([str(corpus)], tmp_path / "clean", opts(**common))
    out = tmp_path / "s"
    with pytest.raises(PrepError):
        build_store([str(corpus)], out, opts(strict=True, **common))
    shards = sorted((out / "train" / "tokens" / "c").iterdir(), key=lambda p: int(p.name))
    torn = out / leftover.format(
        next=int(shards[-1].name) + 1, uuid="0123456789abcdef0123456789abcdef"
    )
    torn.write_bytes(shards[-1].read_bytes()[:1000])  # a torn write
    build_store([str(corpus)], out, opts(**common))
    assert store_files(out) == store_files(tmp_path / "clean")
    assert store_digest(out) == store_digest(tmp_path / "clean")


def test_resume_refuses_inputs_that_shrank(tmp_path):
    corpus = _corpus_with_bad_record_late(tmp_path / "c")
    common = {"batch_chars": 3000, "commit_seconds": 0}
    out = tmp_path / "s"
    with pytest.raises(PrepError):
        build_store([str(corpus)], out, opts(strict=True, **common))
    for f in corpus.iterdir():
        f.write_text(f.read_text().splitlines()[0] + "\n")
    with pytest.raises(PrepError, match="fewer records.*--overwrite"):
        build_store([str(corpus)], out, opts(**common))
