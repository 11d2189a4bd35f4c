"""Fine-tuning stores (`--format sft|pairs`, format version 2): tokens and loss mask against an
independent tiktoken encoding, templates, every bad-input case, and the build guarantees of text
stores (worker count, kill -9 resume, multi-part + finalize, verify)."""

from __future__ import annotations

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
from zeroforge.data_prep.build import PrepError, PrepOptions, build_store, is_val
from zeroforge.data_prep.examples import TEMPLATES, ExampleOptions
from zeroforge.data_prep.parts import finalize, part_dir
from zeroforge.data_prep.pydoc_qa import pydoc_qa
from zeroforge.data_prep.store import StoreError, TokenStore
from zeroforge.data_prep.tokenize import get_encoding
from zeroforge.data_prep.verify import verify_store

from .conftest import (
    EOT,
    REPO,
    TINY,
    TINY_CLI,
    root_attrs,
    store_digest,
    store_files,
    zeroforge_cmd,
)


def ex_opts(fmt: str = "sft", workers: int = 1, **kw) -> PrepOptions:
    example_keys = set(ExampleOptions.__dataclass_fields__)
    examples = ExampleOptions(format=fmt, **{k: kw.pop(k) for k in list(kw) if k in example_keys})
    kw.setdefault("val_fraction", 0.0)  # every example in train unless a test asks for val
    return PrepOptions(examples=examples, layout=TINY, progress=False, workers=workers, **kw)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def examples_of(split) -> list[tuple[np.ndarray, np.ndarray]]:
    off = split.doc_offsets
    return [(split.tokens(int(a), int(b)), split.loss_mask(int(a), int(b)))
            for a, b in zip(off[:-1], off[1:], strict=True)]


def expected_example(pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """The documented encoding, written out with tiktoken: each piece on its own, then EOT."""
    enc = get_encoding("gpt2")
    tokens, mask = [], []
    for text, loss in pieces:
        ids = enc.encode_ordinary(text)
        tokens += ids
        mask += [int(loss)] * len(ids)
    return tokens + [EOT], mask + [1]


def _rng_text(rng: random.Random, lo: int, hi: int) -> str:
    words = "the river stone quantum zebra alpha naïve café 東京 1984 don't (x) <|endoftext|>".split()
    return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))


def test_prompt_response_tokens_and_mask_match_tiktoken(tmp_path):
    rng = random.Random(0)
    rows = [{"prompt": _rng_text(rng, 1, 20), "response": _rng_text(rng, 1, 30)}
            for _ in range(40)]
    src = write_jsonl(tmp_path / "sft.jsonl", rows)
    attrs = build_store([str(src)], tmp_path / "s", ex_opts("sft"))
    assert attrs["format_version"] == 2
    assert attrs["examples"]["template"] == TEMPLATES["plain"].to_json()
    split = TokenStore.open(tmp_path / "s").split("train")
    got = examples_of(split)
    assert len(got) == len(rows)
    for (tokens, mask), row in zip(got, rows, strict=True):
        want_t, want_m = expected_example([(row["prompt"], False), ("\n", False),
                                           (row["response"], True), ("\n", True)])
        assert tokens.tolist() == want_t and mask.tolist() == want_m
    assert split.n_loss_tokens == sum(int(m.sum()) for _, m in got)
    assert verify_store(str(tmp_path / "s")) == []


def test_pairs_mask_is_source_then_target(tmp_path):
    rows = [{"source": f"translate {i}", "target": f"answer number {i} is {i * i}"}
            for i in range(30)]
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    build_store([str(src)], tmp_path / "s", ex_opts("pairs"))
    enc = get_encoding("gpt2")
    for (tokens, mask), row in zip(examples_of(TokenStore.open(tmp_path / "s").split("train")),
                                   rows, strict=True):
        n_src = len(enc.encode_ordinary(row["source"]))
        assert mask.tolist() == [0] * n_src + [1] * (len(tokens) - n_src)
        assert enc.decode(tokens[n_src:-1].tolist()) == row["target"]
    assert verify_store(str(tmp_path / "s")) == []


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_conversation_template_round_trip(tmp_path, name):
    """A chat goes into the store and comes back: the example decodes to the template's text,
    its loss spans are exactly the assistant turns (with their end-of-turn suffix), and the
    prompt `zeroforge sample` builds for the first question is the stored example's prefix."""
    template = TEMPLATES[name]
    chat = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3 + 3?"},
            {"role": "assistant", "content": "It is 6."}]
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": chat}])
    build_store([str(src)], tmp_path / "s", ex_opts("sft", template=name))
    store = TokenStore.open(tmp_path / "s")
    assert store.examples["template"]["name"] == name
    stored = TEMPLATES[name].from_json(store.examples["template"])
    (tokens, mask), = examples_of(store.split("train"))
    enc = get_encoding("gpt2")
    text = "".join(
        p + m["content"] + s for m in chat for p, s in [template.affixes(m["role"])])
    assert enc.decode(tokens[:-1].tolist()) == text
    runs = np.split(np.arange(len(tokens) - 1), np.nonzero(np.diff(mask[:-1]))[0] + 1)
    loss_runs = [enc.decode(tokens[r].tolist()) for r in runs if mask[r[0]]]
    assert loss_runs == [m["content"] + template.assistant[1] for m in chat
                         if m["role"] == "assistant"]
    # The single-turn prompt of the sampler equals a stored single-turn example's prefix.
    src1 = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "What is 2 + 2?", "response": "4"}])
    build_store([str(src1)], tmp_path / "one", ex_opts("sft", template=name))
    (t1, m1), = examples_of(TokenStore.open(tmp_path / "one").split("train"))
    prompt_ids = [i for text, _ in stored.prompt("What is 2 + 2?")
                  for i in enc.encode_ordinary(text)]
    assert t1[: int(np.argmax(m1))].tolist() == prompt_ids


BAD_SFT = [
    ('{"prompt": "p", "response": "r"', "malformed JSON"),
    ('["a list"]', "not a JSON object"),
    ({"response": "r"}, "missing field 'prompt'"),
    ({"prompt": None, "response": "r"}, "field 'prompt' is null"),
    ({"prompt": 3, "response": "r"}, "field 'prompt' is not a string"),
    ({"prompt": "  ", "response": "r"}, "empty field 'prompt'"),
    ({"prompt": "p"}, "missing field 'response'"),
    ({"prompt": "p", "response": ""}, "empty field 'response'"),
    ({"messages": "hi"}, "field 'messages' is not a list"),
    ({"messages": []}, "empty conversation"),
    ({"messages": ["hi"]}, "message is not an object"),
    ({"messages": [{"content": "x"}, {"role": "assistant", "content": "y"}]},
     "missing field 'role'"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "unknown role"),
    ({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "y"}]},
     "field 'content' is null"),
    ({"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "y"}]},
     "field 'content' is not a string"),
    ({"messages": [{"role": "user", "content": "x"}]}, "conversation without an assistant turn"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                   {"role": "user", "content": "z"}]},
     "conversation does not end with an assistant turn"),
    ({"messages": [{"role": "assistant", "content": "y"}]},
     "conversation starts with an assistant turn"),
    ({"prompt": "word " * 40, "response": "r"}, "longer than --max-tokens"),
]
BAD_PAIRS = [
    ({"target": "t"}, "missing field 'source'"),
    ({"source": "s", "target": None}, "field 'target' is null"),
    ({"source": "s", "target": ["t"]}, "field 'target' is not a string"),
    ({"source": "", "target": "t"}, "empty field 'source'"),
    ({"source": "word " * 40, "target": "t"}, "longer than --max-tokens"),
    ({"source": "s", "target": "word " * 40}, "longer than --max-tokens"),
]


@pytest.mark.parametrize("fmt,cases", [("sft", BAD_SFT), ("pairs", BAD_PAIRS)])
def test_every_bad_input_is_skipped_counted_and_logged(tmp_path, caplog, fmt, cases):
    good = ({"prompt": "p", "response": "r"} if fmt == "sft" else {"source": "s", "target": "t"})
    rows = [good] + [row for row, _ in cases] + [good]
    src = write_jsonl(tmp_path / "bad.jsonl", rows)
    with caplog.at_level("WARNING"):
        attrs = build_store([str(src)], tmp_path / "s", ex_opts(fmt, max_tokens=20))
    assert attrs["counts"]["train"]["docs"] == 2
    want: dict[str, int] = {}
    for _, reason in cases:
        want[reason] = want.get(reason, 0) + 1
    by_reason = attrs["skipped"]["by_reason"]
    for reason, n in want.items():
        assert sum(v for k, v in by_reason.items() if k.startswith(reason)) == n, (reason,
                                                                                    by_reason)
    assert attrs["skipped"]["total"] == len(cases)
    for line, (_, reason) in enumerate(cases, start=2):
        assert f"bad.jsonl:{line}: {reason}" in caplog.text
    # --strict stops on the first one, naming file:line, and leaves no complete store.
    with pytest.raises(PrepError, match=rf"bad.jsonl:2: {cases[0][1]}"):
        build_store([str(src)], tmp_path / "strict", ex_opts(fmt, max_tokens=20, strict=True))
    with pytest.raises(StoreError):
        TokenStore.open(tmp_path / "strict")


def test_plain_text_inputs_are_refused_for_example_formats(tmp_path, zf):
    (tmp_path / "a.txt").write_text("just text")
    r = zf("prep", tmp_path / "a.txt", "--out", tmp_path / "s", "--format", "sft", *TINY_CLI)
    assert r.rc == 2 and "a.txt: --format sft reads records with fields" in r.text
    assert not (tmp_path / "s").exists()


def test_text_stores_stay_version_1(built_store):
    attrs = root_attrs(built_store)
    assert attrs["format_version"] == 1 and "examples" not in attrs
    assert set(attrs["prep_config"]) == {"inputs", "tokenizer", "val_fraction", "source",
                                         "layout", "part"}
    assert not any("loss_mask" in f for f in store_files(built_store))
    split = TokenStore.open(built_store).split("train")
    assert not split.has_loss_mask
    with pytest.raises(StoreError, match="no loss mask"):
        split.loss_mask(0, 1)


def test_builtin_pydoc_qa_needs_no_download(tmp_path):
    pairs = list(pydoc_qa())
    assert len(pairs) > 200
    prompts = [r["prompt"] for _, r in pairs]
    assert len(set(prompts)) == len(prompts) and 'The "assert" statement' in prompts
    for fmt in ("sft", "pairs"):
        attrs = build_store(["builtin:pydoc-qa"], tmp_path / fmt, ex_opts(fmt, val_fraction=0.1))
        assert attrs["counts"]["train"]["docs"] + attrs["counts"]["val"]["docs"] == len(pairs)
        assert attrs["counts"]["val"]["docs"] > 0 and attrs["skipped"]["total"] == 0
        assert verify_store(str(tmp_path / fmt)) == []


# --- the build guarantees ---------------------------------------------------------------------
def _sft_corpus(root: Path, n_files: int = 3, rows: int = 400, seed: int = 5) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for f in range(n_files):
        out = []
        for i in range(rows):
            if i % 3 == 0:
                out.append({"messages": [{"role": "user", "content": _rng_text(rng, 1, 30)},
                                         {"role": "assistant", "content": _rng_text(rng, 1, 40)}]})
            else:
                out.append({"prompt": _rng_text(rng, 1, 30), "response": _rng_text(rng, 1, 60)})
        write_jsonl(root / f"f{f}.jsonl", out)
    return root


def test_worker_count_and_multipart_give_the_same_store(tmp_path):
    corpus = _sft_corpus(tmp_path / "c")
    common = {"val_fraction": 0.2, "template": "chat", "batch_chars": 5000}
    build_store([str(corpus)], tmp_path / "one", ex_opts("sft", workers=1, **common))
    build_store([str(corpus)], tmp_path / "two", ex_opts("sft", workers=2, **common))
    assert store_digest(tmp_path / "one") == store_digest(tmp_path / "two")
    for i in range(3):
        build_store([str(corpus)], part_dir(tmp_path / "parts", i, 3), ex_opts("sft", **common),
                    part=(i, 3))
    stitched = finalize(tmp_path / "parts")
    single = root_attrs(tmp_path / "one")
    for key in ("counts", "checksums", "prep_config_hash", "examples", "format_version"):
        assert stitched[key] == single[key], key
    a, b = TokenStore.open(tmp_path / "one"), TokenStore.open(tmp_path / "parts")
    assert a.fingerprint == b.fingerprint
    for split in ("train", "val"):
        sa, sb = a.split(split), b.split(split)
        assert np.array_equal(sa.loss_mask(0, sa.n_tokens), sb.loss_mask(0, sb.n_tokens))
        assert np.array_equal(sa.tokens(0, sa.n_tokens), sb.tokens(0, sb.n_tokens))
    assert verify_store(str(tmp_path / "parts")) == []


def _ledger_commit(out: Path) -> int:
    try:
        return json.loads((out / "_build" / "ledger.json").read_text())["commit"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return -1


def test_sigkill_then_rerun_gives_the_clean_store(tmp_path):
    corpus = _sft_corpus(tmp_path / "c", n_files=4, rows=3000)
    args = ["prep", str(corpus), "--format", "sft", "--template", "chat", "--val-fraction", "0.1",
            "--commit-seconds", "0", *TINY_CLI]
    clean = tmp_path / "clean"
    assert subprocess.run([*zeroforge_cmd(), *args, "--out", str(clean)], cwd=REPO,
                          capture_output=True).returncode == 0
    out, log_path = tmp_path / "killed", tmp_path / "killed.log"
    killed = False
    for attempt in range(3):
        with open(log_path, "ab") as log:
            p = subprocess.Popen([*zeroforge_cmd(), *args, "--out", str(out)], cwd=REPO,
                                 stdout=log, stderr=log, start_new_session=True)
        while p.poll() is None and _ledger_commit(out) < 2 + attempt:
            time.sleep(0.01)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            killed = True
            break
    assert killed, "the build always finished before the kill: make the corpus bigger"
    with pytest.raises(StoreError):
        TokenStore.open(out)
    rerun = subprocess.run([*zeroforge_cmd(), *args, "--out", str(out)], cwd=REPO,
                           capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming" in rerun.stderr
    assert store_digest(out) == store_digest(clean)


@pytest.mark.parametrize("fmt", ["sft", "pairs"])
def test_default_val_share_holds_for_examples_with_their_mask(tmp_path, fmt):
    """The default 1% val share applies to fine-tuning stores too: a small set of examples where
    none hashes to val still gets one (the last), tokens and loss mask together, even when the
    build is stopped midway while that example is held back and then resumed."""
    n = 30  # ids x.jsonl:1..30: none hashes below 1%
    assert not any(is_val(f"x.jsonl:{i + 1}", 0.01) for i in range(n))
    rows = ([{"prompt": f"question {i}?", "response": f"answer {i} " * (i % 4 + 1)}
             for i in range(n)] if fmt == "sft" else
            [{"source": f"translate {i}", "target": f"result {i} " * (i % 3 + 1)}
             for i in range(n)])
    src = write_jsonl(tmp_path / "x.jsonl", rows)
    common = {"val_fraction": 0.01, "batch_chars": 200, "commit_seconds": 0}
    attrs = build_store([str(src)], tmp_path / "clean", ex_opts(fmt, **common))
    assert (attrs["counts"]["val"]["docs"], attrs["counts"]["train"]["docs"]) == (1, n - 1)
    store = TokenStore.open(tmp_path / "clean")
    (val_tokens, val_mask), = examples_of(store.split("val"))
    train = examples_of(store.split("train"))
    if fmt == "sft":
        want = [expected_example([(r["prompt"], False), ("\n", False), (r["response"], True),
                                  ("\n", True)]) for r in rows]
        assert [(t.tolist(), m.tolist()) for t, m in train] == want[:-1]
        assert (val_tokens.tolist(), val_mask.tolist()) == want[-1]
    else:
        n_src = len(get_encoding("gpt2").encode_ordinary(rows[-1]["source"]))
        assert val_mask.tolist() == [0] * n_src + [1] * (len(val_tokens) - n_src)
    assert store.split("val").n_loss_tokens == int(val_mask.sum())
    assert verify_store(str(tmp_path / "clean")) == []
    # Stopped by --strict on a broken line near the end: the held example and its mask are in
    # the last commit, and the resumed build equals the clean one.
    lines = src.read_text().splitlines()
    broken = tmp_path / "broken" / "x.jsonl"
    broken.parent.mkdir()
    broken.write_text("\n".join([*lines[:25], '{"prompt": broken', *lines[25:]]) + "\n")
    clean2 = tmp_path / "clean2"
    build_store([str(broken)], clean2, ex_opts(fmt, **common))
    out = tmp_path / "s"
    with pytest.raises(PrepError, match="malformed JSON"):
        build_store([str(broken)], out, ex_opts(fmt, strict=True, **common))
    with np.load(max((out / "_build").glob("tails-*.npz"))) as tails:
        assert {"held/tokens", "held/loss_mask"} <= set(tails.files)
    build_store([str(broken)], out, ex_opts(fmt, **common))
    assert store_digest(out) == store_digest(clean2)
    assert TokenStore.open(out).attrs["counts"]["val"]["docs"] == 1


def test_verify_checks_the_mask_invariants(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [{"source": f"s {i}", "target": f"t {i}"}
                                             for i in range(20)])
    build_store([str(src)], tmp_path / "s", ex_opts("pairs"))
    assert verify_store(str(tmp_path / "s")) == []
    split = TokenStore.open(tmp_path / "s").split("train")
    eot_at = int(split.doc_offsets[1]) - 1
    # Rewritten through zarr, so every chunk CRC is valid: only the invariants can notice.
    mask = zarr.open_array(str(tmp_path / "s" / "train" / "loss_mask"), mode="r+")
    mask[eot_at] = 0  # example 0 is "s 0" -> "t 0" EOT: tokens 0-1 source, 2-4 target
    mask[3] = 0  # a hole in the target of example 0
    mask[eot_at + 1] = 1  # the source of example 1 starts with a loss token
    problems = "\n".join(verify_store(str(tmp_path / "s")))
    assert "an example's final EOT carries no loss (example 0" in problems
    assert "a pair's mask is not source (0) then target (1) (example 0" in problems
    assert "the first token of an example carries loss (example 1" in problems
    assert "checksum mismatch" in problems and "loss tokens, the store's counts say" in problems


def test_cli_strict_names_file_and_line_and_exits_2(tmp_path, zf):
    src = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r"},
                                             {"prompt": "p", "response": "r"},
                                             {"messages": [{"role": "robot", "content": "x"}]}])
    r = zf("prep", src, "--out", tmp_path / "s", "--format", "sft", "--strict", *TINY_CLI)
    assert r.rc == 2 and "d.jsonl:3: unknown role (message 1: 'robot'" in r.text
    r = zf("prep", src, "--out", tmp_path / "ok", "--format", "sft", *TINY_CLI)
    assert r.rc == 0 and "skipped 1 records" in r.text
    r = zf("inspect", tmp_path / "ok")
    assert "examples    sft  template plain" in r.out and "loss tokens" in r.out


def test_parquet_and_saved_hf_datasets_read_like_jsonl(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    chats = [[{"role": "user", "content": f"question {i}"},
              {"role": "assistant", "content": f"answer {i}"}] for i in range(12)]
    rows = [{"messages": c} for c in chats]
    write_jsonl(tmp_path / "c.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    pairs = [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(12)]
    pq.write_table(pa.Table.from_pylist(pairs), tmp_path / "p.parquet")
    got = {}
    for name in ("c.jsonl", "c.parquet", "hf", "p.parquet"):
        build_store([str(tmp_path / name)], tmp_path / f"s-{name}", ex_opts("sft", template="chat"))
        got[name] = [(t.tolist(), m.tolist()) for t, m in examples_of(
            TokenStore.open(tmp_path / f"s-{name}").split("train"))]
    assert len(got["c.jsonl"]) == 12
    assert got["c.parquet"] == got["c.jsonl"] == got["hf"] == got["p.parquet"]
