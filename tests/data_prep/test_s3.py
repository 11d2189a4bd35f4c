"""Token stores on S3, against a real S3 server on 127.0.0.1 (moto's server mode, see
tests/helpers/s3_server.py); the client library is never mocked. Endpoint and credentials reach
the code the standard way (AWS_* variables, or ~/.aws-style files).

The S3 store and the local `built_store` are built from the same inputs and settings, so every
object must hold the very bytes of the local file of the same name, and every read must return
what the local store returns.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from zeroforge.data_prep.build import build_store
from zeroforge.data_prep.cache import CacheOptions, DiskCache
from zeroforge.data_prep.locations import open_storage
from zeroforge.data_prep.storage import StorageError, WriteConflict
from zeroforge.data_prep.store import StoreError, TokenStore
from zeroforge.data_prep.verify import verify_store
from zeroforge.data_prep.writer import BuildDir, Ledger

from tests.helpers.s3_server import FaultProxy, running_s3_server

from .conftest import (
    REPO,
    TINY,
    TINY_CLI,
    VAL_FRACTION,
    flip_byte,
    opts,
    shard_index,
    zeroforge_cmd,
)

N_CHUNKS = TINY.shard_tokens // TINY.chunk_tokens


@pytest.fixture
def s3(s3_server, monkeypatch, tmp_path):
    """The S3 server in this test's environment, a private chunk cache, and quick failures."""
    s3_server.use(monkeypatch)
    monkeypatch.setenv("ZEROFORGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ZEROFORGE_S3_RETRIES", "2")
    return s3_server


@pytest.fixture(scope="module")
def s3_store(s3_server, corpus):
    """`built_store`'s twin on S3 (same inputs and settings). Read-only: copy before damaging."""
    with pytest.MonkeyPatch.context() as mp:
        s3_server.use(mp)
        url = s3_server.new_bucket() + "/stores/twin"
        build_store([str(corpus.root)], url, opts(val_fraction=VAL_FRACTION, text_mode="paragraph"))
    return url


def _copy_store(src: str, dst: str) -> str:
    a, b = open_storage(src), open_storage(dst)
    for key in a.list(""):
        b.write(key, a.read(key))
    return dst


def _local_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _objects(url: str) -> dict[str, bytes]:
    storage = open_storage(url)
    return {key: storage.read(key) for key in storage.list("")}


# --- writes ---------------------------------------------------------------------------------------
def test_prep_to_s3_writes_exactly_the_bytes_of_a_local_build(s3, s3_store, built_store):
    assert _objects(s3_store) == _local_files(built_store)


def test_cli_prep_inspect_verify_on_s3(zf, s3, corpus, tmp_path):
    url = s3.new_bucket() + "/web"
    args = [str(corpus.root), "--val-fraction", "0.2", *TINY_CLI]
    assert zf("prep", *args, "--out", url, "--workers", "2").rc == 0  # forks beside the client
    again = zf("prep", *args, "--out", url)
    assert again.rc == 0 and "nothing to do" in again.text
    other = zf("prep", *args, "--out", url, "--codec", "zstd")
    assert other.rc == 2 and "other settings" in other.err and len(other.err.splitlines()) == 1
    local = tmp_path / "local"
    assert zf("prep", *args, "--out", local).rc == 0
    assert _objects(url) == _local_files(local)
    info = zf("inspect", url, "--json")
    assert info.rc == 0, info.text
    described = json.loads(info.out)
    assert described["size_bytes"] == sum(len(v) for v in _local_files(local).values())
    assert described["fingerprint"] == TokenStore.open(local).fingerprint
    ok = zf("verify", url)
    assert ok.rc == 0 and ok.out.strip() == f"OK {url}"


def test_fine_tuning_store_on_s3_reads_and_verifies_like_local(s3, tmp_path):
    """A version-2 (sft) store: the loss mask goes up and comes back like the tokens, and
    verify checks the mask's invariants on S3 too."""
    from zeroforge.data_prep.examples import ExampleOptions

    def options():
        return opts(examples=ExampleOptions(format="sft"), val_fraction=0.1)

    url = s3.new_bucket() + "/sft"
    build_store(["builtin:pydoc-qa"], url, options())
    build_store(["builtin:pydoc-qa"], tmp_path / "local", options())
    assert _objects(url) == _local_files(tmp_path / "local")
    local, remote = TokenStore.open(tmp_path / "local"), TokenStore.open(url)
    for name in ("train", "val"):
        x, y = remote.split(name), local.split(name)
        assert x.has_loss_mask and np.array_equal(x.doc_offsets, y.doc_offsets)
        assert np.array_equal(x.tokens(0, x.n_tokens), y.tokens(0, y.n_tokens))
        assert np.array_equal(x.loss_mask(0, x.n_tokens), y.loss_mask(0, y.n_tokens))
    assert verify_store(url) == []
    # The final EOT of example 0 loses its loss, rewritten through zarr so that every chunk's
    # CRC is valid: only the mask invariants can notice.
    eot_at = int(remote.split("train").doc_offsets[1]) - 1
    mask = zarr.open_array(open_storage(url).zarr_store(), path="train/loss_mask", mode="r+")
    mask[eot_at] = 0
    problems = "\n".join(verify_store(url))
    assert "an example's final EOT carries no loss (example 0" in problems


def test_default_val_share_on_s3_equals_a_local_build(s3, tmp_path):
    """The default 1% val share on S3: a small sft set where no example hashes to val gets one
    (the last, with its loss mask), and the example held back for it survives an interrupted
    build there (it travels in the tails object of each commit)."""
    from zeroforge.data_prep.build import PrepError, is_val
    from zeroforge.data_prep.examples import ExampleOptions

    rows = [json.dumps({"prompt": f"question {i}?", "response": f"answer {i}"}) for i in range(30)]
    assert not any(is_val(f"x.jsonl:{i + 1}", 0.01) for i in range(30))
    rows.insert(25, '{"prompt": broken')
    src = tmp_path / "x.jsonl"
    src.write_text("\n".join(rows) + "\n")

    def options(**kw):
        return opts(examples=ExampleOptions(format="sft"), val_fraction=0.01, batch_chars=200,
                    commit_seconds=0, **kw)

    build_store([str(src)], tmp_path / "local", options())
    url = s3.new_bucket() + "/sft"
    with pytest.raises(PrepError, match="malformed JSON"):
        build_store([str(src)], url, options(strict=True))
    storage = open_storage(url)
    tails = max((k for k in storage.list("_build/") if "tails-" in k),
                key=lambda k: int(k.split("-")[1].split(".")[0]))
    with np.load(io.BytesIO(storage.read(tails))) as z:
        assert {"held/tokens", "held/loss_mask"} <= set(z.files)
    attrs = build_store([str(src)], url, options())
    assert attrs["counts"]["val"]["docs"] == 1
    assert _objects(url) == _local_files(tmp_path / "local")
    assert verify_store(url) == []


# --- reads ----------------------------------------------------------------------------------------
def test_reads_equal_the_local_store_and_fetch_only_what_they_need(s3, s3_store, built_store):
    local = TokenStore.open(built_store)
    remote = TokenStore.open(s3_store, check_shards=False)
    storage = remote.storage
    split, want = remote.split("train"), local.split("train")
    # One window: its shard's index (one ranged GET of the tail) and its one or two chunks.
    before = storage.gets, storage.bytes_fetched
    a = 3 * TINY.shard_tokens + 5 * TINY.chunk_tokens + 100
    assert np.array_equal(split.tokens(a, a + 65), want.tokens(a, a + 65))
    chunk_bytes = TINY.chunk_tokens * 2 + 4
    gets, fetched = storage.gets - before[0], storage.bytes_fetched - before[1]
    assert gets == 2 and fetched == N_CHUNKS * 16 + 4 + chunk_bytes  # index + 1 chunk
    # The same window again, and another in the same chunk: no request at all.
    split.tokens(a, a + 65)
    split.tokens(a + 200, a + 300)
    assert storage.gets - before[0] == 2
    # A window across two chunks of a shard whose index is known: one GET for both.
    b = 3 * TINY.shard_tokens + 7 * TINY.chunk_tokens - 10
    assert np.array_equal(split.tokens(b, b + 65), want.tokens(b, b + 65))
    assert storage.gets - before[0] == 3
    # Everything, both splits, documents too.
    for name in ("train", "val"):
        x, y = remote.split(name), local.split(name)
        assert np.array_equal(x.doc_offsets, y.doc_offsets)
        assert np.array_equal(x.tokens(0, x.n_tokens), y.tokens(0, y.n_tokens))
        rng = random.Random(name)
        for _ in range(200):
            lo = rng.randrange(x.n_tokens)
            hi = min(x.n_tokens, lo + rng.randrange(1, 3000))
            assert np.array_equal(x.tokens(lo, hi), y.tokens(lo, hi)), (name, lo, hi)
    # A second process (here: a second open) on the same cache directory fetches no chunk
    # and no index: only the small metadata objects.
    again = TokenStore.open(s3_store)
    again.split("train").tokens(0, split.n_tokens)
    assert again.storage.bytes_fetched < 20_000


def test_prefetch_fetches_in_the_background_what_is_read_next(s3, s3_store, built_store):
    remote = TokenStore.open(s3_store, check_shards=False)
    split, want = remote.split("train"), TokenStore.open(built_store).split("train")
    windows = [(s, s + 65) for s in range(1000, split.n_tokens - 65, 3001)]
    for a, b in windows:
        split.prefetch(a, b)
    remote.close()  # waits for the background fetches
    gets = remote.storage.gets
    for a, b in windows:
        assert np.array_equal(split.tokens(a, b), want.tokens(a, b))
    assert remote.storage.gets == gets, "the reads after the read-ahead needed requests"


def test_chunk_cache_stays_within_its_size(s3, s3_store, tmp_path):
    budget_gb = 60_000 / 1e9  # a quarter of the train split's chunks
    cache = CacheOptions(dir=str(tmp_path / "small"), gb=budget_gb)
    split = TokenStore.open(s3_store, cache=cache).split("train")
    rng = np.random.default_rng(0)
    for a in rng.integers(0, split.n_tokens - 65, 400):
        split.tokens(int(a), int(a) + 65)
    used = DiskCache(tmp_path / "small", "x", int(budget_gb * 1e9)).size()
    assert 0 < used <= 1.1 * budget_gb * 1e9


# --- damaged objects: refused, never zeros --------------------------------------------------------
@pytest.fixture
def s3_copy(s3, s3_store):
    return _copy_store(s3_store, s3.new_bucket() + "/copy")


def test_missing_shard_object_is_refused(s3_copy):
    open_storage(s3_copy).delete(["train/tokens/c/2"])
    with pytest.raises(StoreError, match=r"train/tokens shard c/2: shard object is missing"):
        TokenStore.open(s3_copy)
    split = TokenStore.open(s3_copy, check_shards=False).split("train")
    with pytest.raises(StoreError, match=r"shard c/2: shard object is missing"):
        split.tokens(2 * TINY.shard_tokens + 10, 2 * TINY.shard_tokens + 20)


@pytest.mark.parametrize("cut", [10, 3000])
def test_truncated_shard_object_is_refused(s3_copy, cut):
    storage = open_storage(s3_copy)
    storage.write("val/tokens/c/1", storage.read("val/tokens/c/1")[:-cut])
    with pytest.raises(StoreError, match=r"val/tokens shard c/1"):
        TokenStore.open(s3_copy)


def test_flipped_byte_in_an_object_names_its_chunk(s3_copy, built_store, tmp_path):
    local = tmp_path / "shard"
    local.write_bytes((built_store / "train" / "tokens" / "c" / "3").read_bytes())
    offset, _ = (int(x) for x in shard_index(local, N_CHUNKS)[6])
    flip_byte(local, offset + 100)
    open_storage(s3_copy).write("train/tokens/c/3", local.read_bytes())
    split = TokenStore.open(s3_copy).split("train")
    first = 3 * TINY.shard_tokens + 6 * TINY.chunk_tokens
    with pytest.raises(StoreError, match=r"train/tokens shard c/3 chunk 6: checksum mismatch"):
        split.tokens(first + 400, first + 401)
    assert "checksum mismatch" in verify_store(s3_copy)[0]


@pytest.mark.parametrize("key, what", [("train/tokens", "array 'train/tokens'"),
                                       ("val/doc_offsets", "array 'val/doc_offsets'"),
                                       ("val", "split 'val'")])
def test_missing_metadata_object_is_named(s3_copy, key, what):
    open_storage(s3_copy).delete([f"{key}/zarr.json"])
    with pytest.raises(StoreError, match=rf"{key}/zarr.json: missing \(the metadata of {what}\)"):
        TokenStore.open(s3_copy)
    assert f"{key}/zarr.json: missing" in verify_store(s3_copy)[0]


def test_damaged_cache_file_is_fetched_again(s3, s3_store, built_store):
    split = TokenStore.open(s3_store).split("val")
    want = TokenStore.open(built_store).split("val").tokens(0, split.n_tokens)
    split.tokens(0, split.n_tokens)
    cached = [p for p in Path(os.environ["ZEROFORGE_CACHE_DIR"]).rglob("*") if p.is_file()
              and p.parent.name == "1" and "val/tokens" in p.as_posix() and p.name == "2"]
    assert len(cached) == 1
    flip_byte(cached[0], 50)
    fresh = TokenStore.open(s3_store).split("val")
    assert np.array_equal(fresh.tokens(0, fresh.n_tokens), want)


# --- faults of the connection and the server ------------------------------------------------------
def test_connection_reset_mid_read_is_retried_then_named(s3, s3_store, built_store, monkeypatch):
    port = int(s3.endpoint.rsplit(":", 1)[1])
    proxy = FaultProxy(("127.0.0.1", port)).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        monkeypatch.setenv("ZEROFORGE_S3_RETRIES", "3")
        want = TokenStore.open(built_store).split("train")
        proxy.reset_responses(2, after=300)  # the next two responses die after 300 bytes
        split = TokenStore.open(s3_store, check_shards=False).split("train")
        assert np.array_equal(split.tokens(5000, 9000), want.tokens(5000, 9000))
        assert proxy.resets_done == 2
        proxy.reset_responses(-1, after=300)  # every response from now on
        with pytest.raises(StorageError) as err:
            split.tokens(20000, 20100)
        message = str(err.value)
        assert "\n" not in message and "train/tokens/c/" in message and "3 retries" in message
    finally:
        proxy.stop()


def test_server_down_at_start_is_a_clear_error(zf, s3, s3_store, corpus, monkeypatch):
    from tests.helpers.s3_server import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nobody listens
    monkeypatch.setenv("ZEROFORGE_S3_RETRIES", "1")
    for argv in (["inspect", s3_store], ["verify", s3_store],
                 ["prep", str(corpus.root), "--out", s3_store + "-new", *TINY_CLI]):
        r = zf(*argv)
        assert r.rc == 1, (argv, r.text)
        (line,) = r.err.strip().splitlines()
        assert "cannot reach the S3 endpoint" in line and s3_store in line, line


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """A second server that checks credentials: the first 4 requests (creating a user, its
    policy and its key, then a bucket) go unchecked, every later one is verified."""
    import boto3

    with running_s3_server(tmp_path_factory.mktemp("auth"),
                           env={"INITIAL_NO_AUTH_ACTION_COUNT": "4"}) as server:
        iam = boto3.client("iam", endpoint_url=server.endpoint, region_name="us-east-1",
                           aws_access_key_id="x", aws_secret_access_key="y")
        iam.create_user(UserName="zf")
        iam.put_user_policy(UserName="zf", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17",
             "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="zf")["AccessKey"]
        s3 = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1",
                          aws_access_key_id=key["AccessKeyId"],
                          aws_secret_access_key=key["SecretAccessKey"])
        s3.create_bucket(Bucket="zf-auth")
        yield server, key["AccessKeyId"], key["SecretAccessKey"]


def test_wrong_credentials_are_a_clear_error(zf, s3, auth_server, corpus, monkeypatch):
    server, key_id, secret = auth_server
    server.use(monkeypatch)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    url = "s3://zf-auth/store"
    assert zf("prep", str(corpus.root), "--out", url, *TINY_CLI).rc == 0
    assert zf("inspect", url).rc == 0
    for variable, value in (("AWS_SECRET_ACCESS_KEY", "wrong"), ("AWS_ACCESS_KEY_ID", "AKIANOBODY")):
        with monkeypatch.context() as m:
            m.setenv(variable, value)
            r = zf("inspect", url)
            assert r.rc == 1
            (line,) = r.err.strip().splitlines()
            assert "403" in line and "check the AWS credentials" in line and "zarr.json" in line


def test_endpoint_and_credentials_from_aws_config_files(zf, s3, s3_store, tmp_path, monkeypatch):
    config, credentials = tmp_path / "config", tmp_path / "credentials"
    config.write_text(f"[profile zf]\nregion = us-east-1\nendpoint_url = {s3.endpoint}\n")
    credentials.write_text("[zf]\naws_access_key_id = testing\naws_secret_access_key = testing\n")
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_PROFILE", "zf")
    assert zf("verify", s3_store).rc == 0


# --- URLs we do not handle ------------------------------------------------------------------------
@pytest.mark.parametrize("url", ["gs://bucket/store", "hdfs://nn/store", "az://c/store",
                                 "http://example.invalid/store", "s3://ab/store", "s3:///store"])
def test_unsupported_locations_are_refused_in_one_line(zf, corpus, tmp_path, monkeypatch, url):
    monkeypatch.chdir(tmp_path)
    r = zf("prep", str(corpus.root), "--out", url, *TINY_CLI)
    assert r.rc == 2 and len(r.err.strip().splitlines()) == 1 and url in r.err, r.text
    assert not any(tmp_path.iterdir()), "a URL became a local folder"
    for command in ("inspect", "verify"):
        r = zf(command, url)
        assert r.rc == 1 and len(r.err.strip().splitlines()) == 1 and url in r.err, r.text
    assert zf("prep", "--finalize", url).rc == 2
    assert not any(tmp_path.iterdir())


# --- multi-part builds: a Slurm array writing to object storage -----------------------------------
def test_parts_and_finalize_on_s3_equal_a_single_local_build(zf, s3, corpus, tmp_path):
    inputs = [str(corpus.root / f"doc_{i:02d}.txt") for i in range(6)]
    args = ["--val-fraction", "0.3", "--text-mode", "paragraph", *TINY_CLI]
    url = s3.new_bucket() + "/multi"
    for i in range(3):
        env_free = zf("prep", *inputs, "--out", url, *args, "--num-parts", "3", "--part", str(i))
        assert env_free.rc == 0, env_free.text
    assert zf("prep", "--finalize", url).rc == 0
    assert zf("prep", "--finalize", url).rc == 0  # rerun: nothing to do
    assert not [k for k in open_storage(url).list("") if k.startswith(("parts/", "_finalize"))]
    single = tmp_path / "single"
    assert zf("prep", *inputs, "--out", single, *args).rc == 0
    s, t = TokenStore.open(url), TokenStore.open(single)
    assert s.fingerprint == t.fingerprint and s.attrs["counts"] == t.attrs["counts"]
    for name in ("train", "val"):
        x, y = s.split(name), t.split(name)
        assert np.array_equal(x.doc_offsets, y.doc_offsets)
        assert np.array_equal(x.tokens(0, x.n_tokens), y.tokens(0, y.n_tokens))
    assert verify_store(url) == []


# --- interrupted and concurrent builds ------------------------------------------------------------
def _jsonl_corpus(root: Path, n_files: int = 3, mb_per_file: float = 0.7) -> Path:
    rng = random.Random(5)
    vocab = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 8))) for _ in range(2000)]
    root.mkdir(parents=True)
    for f in range(n_files):
        lines, size = [], 0
        while size < mb_per_file * 1e6:
            line = json.dumps({"text": " ".join(rng.choices(vocab, k=rng.randint(20, 300)))}) + "\n"
            lines.append(line)
            size += len(line)
        (root / f"part-{f}.jsonl").write_text("".join(lines))
    return root


def _start_prep(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        return subprocess.Popen([*zeroforge_cmd(), "prep", *args], cwd=REPO, stdout=log,
                                stderr=log, env=env, start_new_session=True)


def _ledger_commit(storage) -> int:
    try:
        return json.loads(storage.read("_build/ledger.json"))["commit"]
    except (StorageError, json.JSONDecodeError):
        return -1


def test_kill_9_during_an_s3_build_then_rerun_gives_the_clean_store(s3, tmp_path):
    corpus = _jsonl_corpus(tmp_path / "corpus")
    args = [str(corpus), "--val-fraction", "0.1", "--commit-seconds", "0", *TINY_CLI]
    clean = tmp_path / "clean"
    build = subprocess.run([*zeroforge_cmd(), "prep", *args, "--out", str(clean)], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    url = s3.new_bucket() + "/killed"
    storage, env, log_path = open_storage(url), dict(os.environ), tmp_path / "prep.log"
    p = _start_prep([*args, "--out", url], env, log_path)
    while p.poll() is None and _ledger_commit(storage) < 1:
        time.sleep(0.02)
    time.sleep(random.Random(1).uniform(0.1, 0.6))
    assert p.poll() is None, "the build ended before it could be killed: grow the corpus"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    with pytest.raises(StoreError):
        TokenStore.open(url)
    p = _start_prep([*args, "--out", url], env, log_path)
    assert p.wait(timeout=300) == 0, log_path.read_text()[-3000:]
    assert "resuming" in log_path.read_text()
    assert _objects(url) == _local_files(clean)


@pytest.mark.parametrize("where", ["s3", "local"])
def test_a_build_that_lost_its_claim_stops_at_its_next_commit(s3, tmp_path, where):
    location = s3.new_bucket() + "/claimed" if where == "s3" else str(tmp_path / "claimed")
    storage = open_storage(location)
    first, second = BuildDir(storage), BuildDir(open_storage(location))
    ledger = Ledger("hash")
    first.write_initial(ledger)
    with pytest.raises(WriteConflict, match="another process is writing this store"):
        BuildDir(open_storage(location)).write_initial(Ledger("hash"))  # create-only
    first.commit(ledger, {})
    resumed, _ = second.load()
    second.take(resumed)  # a rerun took the build over while the first still ran
    with pytest.raises(WriteConflict, match="another process is writing this store"):
        first.commit(ledger, {})
    with pytest.raises(WriteConflict):
        first.finish(ledger, {"complete": True})
    second.commit(resumed, {})  # the owner goes on


def test_two_builds_at_once_on_one_s3_store(s3, tmp_path):
    corpus = _jsonl_corpus(tmp_path / "corpus", n_files=2, mb_per_file=0.4)
    args = [str(corpus), "--commit-seconds", "0", *TINY_CLI]
    clean = tmp_path / "clean"
    assert subprocess.run([*zeroforge_cmd(), "prep", *args, "--out", str(clean)], cwd=REPO,
                          capture_output=True, timeout=300).returncode == 0
    url = s3.new_bucket() + "/both"
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [_start_prep([*args, "--out", url], dict(os.environ), log) for log in logs]
    codes = [p.wait(timeout=300) for p in procs]
    # One of them finishes (the other may lose its claim and stop, or find the work done), and
    # what is left is exactly the clean store, complete.
    assert 0 in codes, [log.read_text()[-2000:] for log in logs]
    assert _objects(url) == _local_files(clean)


@pytest.mark.parametrize("url", ["s3://bucket/corpus.jsonl", "gs://bucket/c.txt"])
def test_input_urls_are_refused_not_read_as_local_paths(zf, tmp_path, url):
    r = zf("prep", url, "--out", tmp_path / "out", *TINY_CLI)
    assert r.rc == 2 and "not URLs" in r.err and len(r.err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_bucket_that_does_not_exist_is_named(zf, s3, corpus):
    r = zf("prep", str(corpus.root), "--out", "s3://no-such-bucket-zf/x", *TINY_CLI)
    assert r.rc == 1
    (line,) = r.err.strip().splitlines()
    assert "NoSuchBucket" in line and "s3://no-such-bucket-zf/x" in line and "retries" not in line
