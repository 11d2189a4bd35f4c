"""Bad inputs and run-time faults, through the real `zeroforge` command: each ends in one line
`zeroforge <command>: error: ...` naming the file, flag or key, with the contract's exit code
(1 failed, 2 bad input or command line), and no traceback. Environment faults are real: a
read-only and a full filesystem are small tmpfs mounts (root only, as in the Slurm tests), the
"not MLflow" server is Python's http.server, the checkpoints come from a real training run.
"""

from __future__ import annotations

import bz2
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zstandard
from zeroforge.pipeline.errors import EXIT_CONFIG, EXIT_FAILED
from zeroforge.pipeline.training import checkpoint as ckpt

from tests.e2e.conftest import PYTHON, REPO, free_port, launch, tiny_overrides

TINY = str(REPO / "configs" / "gpt2-tiny-cpu.yaml")


def zf(*args: object, cwd: Path = REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "zeroforge.launch", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def assert_one_line(p: subprocess.CompletedProcess, command: str, code: int, *expected: str
                    ) -> str:
    """The command failed with ``code`` and ended with one error line holding ``expected``."""
    assert "Traceback" not in p.stderr, p.stderr[-4000:]
    assert p.returncode == code, p.stderr[-4000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f"zeroforge {command}: error: "), last
    for text in expected:
        assert text in last, last
    return last


def _corpus(d: Path, n: int = 3000) -> bytes:
    d.mkdir(parents=True, exist_ok=True)
    return "".join(json.dumps({"text": f"row {i} " + "word " * 30}) + "\n"
                   for i in range(n)).encode()


def _truncated_gz(d: Path) -> tuple[list, int, list[str]]:
    data = gzip.compress(_corpus(d))
    (d / "c.jsonl.gz").write_bytes(data[: len(data) // 2])
    return (["prep", d / "c.jsonl.gz", "--out", d / "s"], EXIT_CONFIG,
            ["c.jsonl.gz:", "cannot be read", "truncated or corrupt"])


def _corrupt_gz(d: Path) -> tuple[list, int, list[str]]:
    data = bytearray(gzip.compress(_corpus(d)))
    data[200:260] = bytes(60)
    (d / "c.jsonl.gz").write_bytes(bytes(data))
    return (["prep", d / "c.jsonl.gz", "--out", d / "s"], EXIT_CONFIG,
            ["c.jsonl.gz:", "cannot be read"])


def _truncated_zst(d: Path) -> tuple[list, int, list[str]]:
    data = zstandard.ZstdCompressor().compress(_corpus(d))
    (d / "c.jsonl.zst").write_bytes(data[: len(data) // 2])
    return (["prep", d / "c.jsonl.zst", "--out", d / "s"], EXIT_CONFIG,
            ["c.jsonl.zst:", "ends inside a zstd frame"])


def _truncated_examples(d: Path, fmt: str, suffix: str) -> tuple[list, int, list[str]]:
    """A fine-tuning input (``--format sft|pairs``) cut in half: named like a text input."""
    d.mkdir(parents=True, exist_ok=True)
    keys = ("prompt", "response") if fmt == "sft" else ("source", "target")
    rows = "".join(json.dumps({keys[0]: f"question {i} " + "word " * 20, keys[1]: f"answer {i}"})
                   + "\n" for i in range(3000)).encode()
    data = gzip.compress(rows) if suffix == "gz" else bz2.compress(rows)
    name = f"x.jsonl.{suffix}"
    (d / name).write_bytes(data[: len(data) // 2])
    return (["prep", d / name, "--out", d / "s", "--format", fmt], EXIT_CONFIG,
            [f"{name}:", "cannot be read", "truncated or corrupt"])


def _a_file(d: Path, name: str) -> Path:
    (d / name).write_text("not a directory, not a database\n")
    return d / name


def _store_without(store: Path, d: Path, meta: str) -> Path:
    broken = d / "store"
    shutil.copytree(store, broken)
    (broken / meta).unlink()
    return broken


CASES: dict[str, Callable[[Path, Path], tuple[list, int, list[str]]]] = {
    "prep-truncated-jsonl-gz": lambda d, s: _truncated_gz(d),
    "prep-corrupt-jsonl-gz": lambda d, s: _corrupt_gz(d),
    "prep-truncated-jsonl-zst": lambda d, s: _truncated_zst(d),
    "prep-sft-truncated-jsonl-gz": lambda d, s: _truncated_examples(d, "sft", "gz"),
    "prep-pairs-truncated-jsonl-bz2": lambda d, s: _truncated_examples(d, "pairs", "bz2"),
    "prep-commit-seconds-negative": lambda d, s: (
        ["prep", "builtin:pydoc-topics", "--out", d / "s", "--commit-seconds", "-1"],
        EXIT_CONFIG, ["--commit-seconds must be >= 0, got -1.0"]),
    "inspect-array-without-zarr-json": lambda d, s: (
        ["inspect", _store_without(s, d, "train/tokens/zarr.json")], EXIT_FAILED,
        ["train/tokens/zarr.json: missing (the metadata of array 'train/tokens')"]),
    "train-array-without-zarr-json": lambda d, s: (
        ["train", "--config", TINY, f"data.store={_store_without(s, d, 'val/doc_offsets/zarr.json')}",
         f"run_dir={d / 'run'}"], EXIT_FAILED,
        ["val/doc_offsets/zarr.json: missing (the metadata of array 'val/doc_offsets')"]),
    "train-run-dir-is-a-file": lambda d, s: (
        ["train", "--config", TINY, f"data.store={s}",
         f"run_dir={_a_file(d, 'f')}"], EXIT_CONFIG,
        ["invalid run config: run_dir: ", "f is a file, not a directory"]),
    "train-vocab-smaller-than-store": lambda d, s: (
        ["train", "--config", TINY, f"data.store={s}", "model.vocab_size=1000"], EXIT_CONFIG,
        ["model.vocab_size: 1000 is smaller than the 50257 tokens (tokenizer gpt2) of the "
         "token store"]),
    "export-out-is-a-file": lambda d, s: (
        ["export", "--checkpoint", d, "--out", _a_file(d, "f"), "--overwrite"], EXIT_CONFIG, ["is a file, not a directory", "choose another --out"]),
    "sample-device-cuda-without-cuda": lambda d, s: (
        ["sample", "--checkpoint", d, "--device", "cuda"], EXIT_CONFIG,
        ["--device cuda: CUDA is not available here", "use --device cpu"]),
    "slurm-time-banana": lambda d, s: (
        ["launch", "slurm", "--config", TINY, f"data.store={s}", "--time", "banana",
         "--dry-run"], EXIT_CONFIG, ["--time 'banana': not a Slurm time limit"]),
    "slurm-time-out-of-range": lambda d, s: (
        ["launch", "slurm", "--config", TINY, f"data.store={s}", "--time", "25:99:99",
         "--dry-run"], EXIT_CONFIG, ["--time '25:99:99': minutes must be below 60"]),
    "slurm-mem-lots": lambda d, s: (
        ["launch", "slurm", "--config", TINY, f"data.store={s}", "--mem", "lots", "--dry-run"],
        EXIT_CONFIG, ["--mem 'lots': expected a size such as 200G"]),
    "sqlite-uri-on-a-text-file": lambda d, s: (
        ["train", "--config", TINY, f"data.store={s}", f"run_dir={d / 'run'}",
         "tracking.backend=mlflow",
         f"tracking.tracking_uri=sqlite:///{_a_file(d, 'notes.txt')}"],
        EXIT_CONFIG, ["notes.txt is not an sqlite database"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line(case, tiny_store, tmp_path):
    argv, code, expected = CASES[case](tmp_path, tiny_store)
    p = zf(*argv)
    last = assert_one_line(p, str(argv[0]), code, *expected)
    if case.startswith("prep-"):
        assert "rerun the same command" not in last  # the input is bad: a rerun would loop


def test_verify_names_the_missing_array_metadata(tiny_store, tmp_path):
    p = zf("verify", _store_without(tiny_store, tmp_path, "train/tokens/zarr.json"))
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].endswith(
        "train/tokens/zarr.json: missing (the metadata of array 'train/tokens')")


def test_mlflow_uri_that_is_not_mlflow(tiny_store, tmp_path):
    port = free_port()
    web = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind",
                            "127.0.0.1", "--directory", str(tmp_path)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        p = zf("train", "--config", TINY, f"data.store={tiny_store}", f"run_dir={tmp_path / 'r'}",
               "tracking.backend=mlflow", f"tracking.tracking_uri=http://127.0.0.1:{port}")
    finally:
        web.terminate()
        web.wait()
    assert_one_line(p, "train", EXIT_CONFIG, f"http://127.0.0.1:{port} is not an MLflow "
                    "tracking server (HTTP 404 to MLflow's API)")
    assert "<html" not in p.stderr.lower()


def test_option_values_and_overrides_in_any_order(tiny_store):
    p = zf("train", "--config", "gpt2-tiny-cpu", "--nproc", "1", f"data.store={tiny_store}",
           "train.max_steps=7", "--print-config")
    assert p.returncode == 0, p.stderr
    assert "max_steps: 7" in p.stdout


def test_warnings_instead_of_surprises(tiny_store, tmp_path):
    cores = len(os.sched_getaffinity(0))
    p = zf("prep", "builtin:pydoc-topics", "--out", tmp_path / "s", "--workers", "1000",
           "--no-progress")
    assert p.returncode == 0, p.stderr
    assert f"--workers 1000 is more than the {cores} CPU cores available; using {cores}" in p.stderr
    p = zf("launch", "slurm", "--config", TINY, f"data.store={tiny_store}", "--time", "00:01:00",
           "--dry-run")
    assert p.returncode == 0, p.stderr
    assert "--signal-grace 300 s is not shorter than --time 00:01:00 (60 s)" in p.stderr
    assert "#SBATCH --time=00:01:00" in p.stdout


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def trained(tiny_store, tmp_path_factory) -> Path:
    """A real 1-rank run with a committed checkpoint at step 2."""
    run_dir = tmp_path_factory.mktemp("faults-run")
    result = launch(run_dir, tiny_overrides(tiny_store, run_dir, **{"train.max_steps": 2}),
                    nproc=1)
    assert result.returncode == 0, result.output[-4000:]
    return run_dir


def _damaged_copy(run: Path, d: Path, legacy: bool = False) -> Path:
    """A copy of ``run`` whose model-states file is cut in half; ``legacy``: its commit marker
    names no manifest, as a checkpoint written before manifests existed."""
    copy = d / "run"
    shutil.copytree(run, copy)
    tag = copy / "checkpoints" / ckpt.tag_for(2)
    states = tag / "mp_rank_00_model_states.pt"
    os.truncate(states, states.stat().st_size // 2)
    if legacy:
        marker = json.loads((tag / ckpt.MARKER).read_text())
        del marker["manifest_crc32c"]
        (tag / ckpt.MARKER).write_text(json.dumps(marker))
    return copy


@pytest.mark.parametrize("legacy", [False, True], ids=["manifest", "legacy-no-manifest"])
@pytest.mark.parametrize("command", ["eval", "sample", "export"])
def test_truncated_checkpoint_is_one_line(trained, tmp_path, command, legacy):
    run = _damaged_copy(trained, tmp_path, legacy)
    extra = {"eval": [], "sample": ["--prompt", "hi"], "export": ["--out", tmp_path / "hf"]}
    p = zf(command, "--checkpoint", run, *extra[command])
    expected = ("cannot be read" if legacy else
                "mp_rank_00_model_states.pt: truncated")
    assert_one_line(p, command, EXIT_FAILED, "mp_rank_00_model_states.pt", expected)


def test_init_from_a_corrupt_checkpoint(trained, tiny_store, tmp_path):
    run = _damaged_copy(trained, tmp_path)
    p = zf("train", "--config", TINY,
           *tiny_overrides(tiny_store, tmp_path / "new", **{"init_from": run}))
    assert_one_line(p, "train", EXIT_FAILED, "init_from: corrupt checkpoint:",
                    "mp_rank_00_model_states.pt: truncated")


def test_resume_after_a_family_change_names_model_family(trained, tiny_store, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    p = zf("train", "--config", REPO / "configs" / "t5-tiny-cpu.yaml",
           *tiny_overrides(tiny_store, run, **{"train.max_steps": 4}))
    assert_one_line(p, "train", EXIT_FAILED, "cannot resume from",
                    "model.family: 'gpt2' -> 'encdec'")
    assert "model.n_layer" not in p.stderr.strip().splitlines()[-1]


def test_bit_flipped_shard_during_training_is_the_last_line(tiny_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    shard = store / "train" / "tokens" / "c" / "0"
    data = bytearray(shard.read_bytes())
    data[5000] ^= 0x01  # inside the first chunk: checked the first time a window touches it
    shard.write_bytes(bytes(data))
    p = zf("train", "--config", TINY, "--nproc", "2",
           *tiny_overrides(store, tmp_path / "run", **{"train.max_steps": 3}))
    assert_one_line(p, "train", EXIT_FAILED, "train/tokens shard c/0 chunk 0: checksum mismatch")


# ----------------------------------------------------------------------------- environment


@pytest.fixture
def tmpfs(tmp_path) -> Iterator[Callable[..., Path]]:
    """Mount small tmpfs filesystems (size, read-only) under tmp_path; unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small or read-only tmpfs needs root")
    mounts: list[Path] = []

    def mount(name: str, options: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], check=True)
        mounts.append(point)
        return point

    yield mount
    for point in reversed(mounts):
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_prep_on_a_read_only_out(tmpfs):
    ro = tmpfs("ro", "ro,size=1m")
    p = zf("prep", "builtin:pydoc-topics", "--out", ro / "s", "--no-progress")
    assert_one_line(p, "prep", EXIT_FAILED, f"{ro / 's'}: Read-only file system")


def test_prep_on_a_full_disk_resumes_once_there_is_room(tmpfs, tmp_path):
    small = tmpfs("small", "size=300k")
    args = ["prep", "builtin:pydoc-topics", "--out", small / "s", "--no-progress",
            "--shard-tokens", "65536", "--chunk-tokens", "4096", "--commit-seconds", "0"]
    p = zf(*args)
    assert_one_line(p, "prep", EXIT_FAILED, "No space left on device",
                    "free space, then rerun the same command")
    assert zf("verify", small / "s").returncode == 1  # nothing half-written reads as valid
    subprocess.run(["mount", "-o", "remount,size=8m", str(small)], check=True)
    p = zf(*args)
    assert p.returncode == 0, p.stderr[-3000:]
    assert zf("verify", small / "s").returncode == 0


def test_checkpoint_save_on_a_full_disk(tmpfs, tiny_store, tmp_path):
    small = tmpfs("ckpt", "size=20m")  # the model states fit, the optimizer shard does not
    p = zf("train", "--config", TINY, *tiny_overrides(tiny_store, tmp_path / "run", **{
        "train.max_steps": 2, "checkpoint.dir": small / "ck"}))
    assert_one_line(p, "train", EXIT_FAILED, "checkpoint step 2 could not be written to",
                    "no space left on the device", "the newest committed checkpoint is none")
    assert ckpt.committed(small / "ck") == []


def test_interrupted_prep_is_one_line_and_resumes(tmp_path):
    corpus = tmp_path / "c"
    (corpus / "big.jsonl").parent.mkdir()
    (corpus / "big.jsonl").write_bytes(_corpus(corpus, 100_000))
    argv = ["prep", corpus / "big.jsonl", "--out", tmp_path / "s", "--workers", "2",
            "--commit-seconds", "0", "--no-progress"]
    proc = subprocess.Popen([PYTHON, "-m", "zeroforge.launch", *map(str, argv)], cwd=REPO,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    ledger = tmp_path / "s" / "_build" / "ledger.json"
    while not (ledger.is_file() and json.loads(ledger.read_text())["commit"] >= 1):
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    # Ctrl-C reaches the whole foreground process group: the command and its workers.
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        "zeroforge prep: interrupted: rerun the same command to continue from the last commit")
    p = zf(*argv)
    assert p.returncode == 0 and "resuming" in p.stderr, p.stderr[-3000:]
    assert zf("verify", tmp_path / "s").returncode == 0
