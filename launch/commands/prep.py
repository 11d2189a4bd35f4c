"""`zeroforge prep INPUT... --out STORE`: build, resume, build one part, or stitch parts."""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

from zeroforge.data_prep.build import DEFAULT_VAL_FRACTION, PrepError, PrepOptions, build_store
from zeroforge.data_prep.examples import FORMATS, TEMPLATES, ExampleOptions
from zeroforge.data_prep.parts import finalize, part_dir
from zeroforge.data_prep.sources import BUILTIN_CORPORA, TEXT_MODES, SourceError, SourceOptions
from zeroforge.data_prep.storage import StorageError
from zeroforge.data_prep.store import CODECS, Layout, StoreError
from zeroforge.data_prep.tokenize import ENCODINGS, TokenizerError
from zeroforge.pipeline.errors import (
    EXIT_CONFIG,
    EXIT_FAILED,
    ZeroforgeError,
    describe_os_error,
    is_disk_full,
    reported_as,
)

log = logging.getLogger("zeroforge.prep")
# Said after Ctrl-C: nothing half-written reads as valid, and the build resumes.
INTERRUPTED = "rerun the same command to continue from the last commit"

EPILOG = f"""inputs: files, directories and globs (read in sorted order); .jsonl/.jsonl.gz/.jsonl.zst,
.parquet, plain text otherwise; a directory written by datasets' save_to_disk; hf:NAME[:CONFIG]
for a Hugging Face hub dataset; builtin corpora that need no download: {', '.join(BUILTIN_CORPORA)}.
Rerun the same command after an interruption to continue; rerunning on a complete store is a no-op.
--out (and --finalize) take a local directory or s3://BUCKET/PREFIX; S3 endpoint and credentials
come from the standard AWS variables and ~/.aws files (docs/token-store.md, "Object storage").

formats: text (documents, the default); sft (prompt/response fields, or a chat in --messages-field,
rendered through --template); pairs (source/target fields, for the encoder-decoder).
templates: """ + "; ".join(f"{t.name}: {t.description}" for t in TEMPLATES.values()) + ".\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="corpus files, dirs, globs, hf:NAME, builtin:NAME")
    p.add_argument("--out", help="token store to create: a directory or s3://BUCKET/PREFIX")
    p.add_argument("--tokenizer", default="gpt2", choices=ENCODINGS, help="tiktoken encoding (default gpt2)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    p.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                   help=f"share of documents for the val split, by id hash (default {DEFAULT_VAL_FRACTION}; "
                        "at least one document when there are two or more; 0: no val split)")
    p.add_argument("--text-mode", default="file", choices=TEXT_MODES, help="plain text: one document per file/paragraph/line")
    p.add_argument("--text-field", default="text", help="JSONL/Parquet/HF field with the text (default text)")
    p.add_argument("--id-field", default="id", help="field used as document id when present (default id)")
    p.add_argument("--split", default="train", dest="hf_split", help="Hugging Face dataset split (default train)")
    d = ExampleOptions()
    p.add_argument("--format", default=d.format, choices=FORMATS, help="what a record is (default text)")
    p.add_argument("--prompt-field", default=d.prompt_field, help="sft: prompt field (default prompt)")
    p.add_argument("--response-field", default=d.response_field, help="sft: response field (default response)")
    p.add_argument("--messages-field", default=d.messages_field,
                   help="sft: chat field, a list of {role, content} (default messages)")
    p.add_argument("--template", default=d.template, choices=list(TEMPLATES),
                   help="sft: how a chat becomes text (default plain)")
    p.add_argument("--source-field", default=d.source_field, help="pairs: source field (default source)")
    p.add_argument("--target-field", default=d.target_field, help="pairs: target field (default target)")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens,
                   help="sft/pairs: skip longer examples (sft: whole example; pairs: either side) (default 1024)")
    p.add_argument("--streaming", action="store_true", help="stream a Hugging Face hub dataset")
    p.add_argument("--strict", action="store_true", help="fail on the first bad record instead of skipping it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store built with other settings")
    p.add_argument("--codec", default="none", choices=CODECS, help="chunk compression (default none: see docs)")
    p.add_argument("--shard-tokens", type=int, default=Layout.shard_tokens, help="tokens per shard file")
    p.add_argument("--chunk-tokens", type=int, default=Layout.chunk_tokens, help="tokens per inner chunk")
    p.add_argument("--commit-seconds", type=float, default=30.0, help="seconds between resumable commits")
    p.add_argument("--num-parts", type=int, default=None, help="split the input into K parts (default $SLURM_ARRAY_TASK_COUNT)")
    p.add_argument("--part", type=int, default=None, help="build part I of K (default $SLURM_ARRAY_TASK_ID)")
    p.add_argument("--finalize", metavar="STORE", help="stitch the built parts of STORE into one store")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress log lines")


def _part_from_env(args) -> tuple[int, int] | None:
    k, i = args.num_parts, args.part
    if k is None and "SLURM_ARRAY_TASK_COUNT" in os.environ:
        k = int(os.environ["SLURM_ARRAY_TASK_COUNT"])
    if i is None and "SLURM_ARRAY_TASK_ID" in os.environ and k is not None:
        # The task id itself: resubmitting only task 3 of `--array=0-7` must rebuild part 3.
        # (Its SLURM_ARRAY_TASK_COUNT is then 1, so such a resubmission passes --num-parts.)
        i = int(os.environ["SLURM_ARRAY_TASK_ID"])
    if k is None and i is None:
        return None
    if k is None or i is None:
        raise PrepError("--num-parts and --part go together (or come from a Slurm job array)")
    if not 0 <= i < k:
        raise PrepError(f"--part must be in [0, {k}), got {i}")
    return i, k


def options_from_args(args) -> PrepOptions:
    return PrepOptions(
        tokenizer=args.tokenizer,
        val_fraction=args.val_fraction,
        source=SourceOptions(args.text_mode, args.text_field, args.id_field, args.hf_split, args.streaming),
        examples=ExampleOptions(args.format, args.prompt_field, args.response_field, args.messages_field,
                                args.source_field, args.target_field, args.template, args.max_tokens),
        layout=Layout(
            shard_tokens=args.shard_tokens,
            chunk_tokens=args.chunk_tokens,
            offsets_shard=Layout.offsets_shard,
            offsets_chunk=Layout.offsets_chunk,
            codec=args.codec,
        ),
        workers=args.workers,
        strict=args.strict,
        overwrite=args.overwrite,
        commit_seconds=args.commit_seconds,
        progress=not args.no_progress,
    )


def run(args) -> int:
    try:
        return _run(args)
    except OSError as e:  # the machine, not the command line: a full disk, a read-only --out
        advice = ("; the build resumes: free space, then rerun the same command"
                  if is_disk_full(e) else "")
        raise ZeroforgeError(f"cannot build the store: {describe_os_error(e, args.out)}{advice}",
                             EXIT_FAILED) from None


def _run(args) -> int:
    t0 = time.monotonic()
    # Bad settings exit 2; a store or server that fails under a sound command line exits 1.
    with reported_as(EXIT_FAILED, StorageError, StoreError), \
            reported_as(EXIT_CONFIG, PrepError, SourceError, TokenizerError):
        if args.finalize:
            attrs = finalize(args.finalize)
        else:
            if not args.out:
                raise PrepError("--out is required")
            if not args.inputs:
                raise PrepError("no INPUT given")
            part = _part_from_env(args)
            out = part_dir(args.out, *part) if part else args.out
            attrs = build_store(args.inputs, out, options_from_args(args), part=part)
    elapsed = time.monotonic() - t0
    counts = attrs["counts"]
    tokens = sum(c["tokens"] for c in counts.values())
    log.info(
        "done in %.1fs: %s; skipped %d records%s; %.0f tokens/s, %.1f MB/s of text",
        elapsed,
        ", ".join(f"{s}: {c['docs']:,} docs, {c['tokens']:,} tokens" for s, c in counts.items()),
        attrs["skipped"]["total"],
        f" {json.dumps(attrs['skipped']['by_reason'])}" if attrs["skipped"]["total"] else "",
        tokens / max(elapsed, 1e-9),
        attrs["text_bytes"] / 1e6 / max(elapsed, 1e-9),
    )
    return 0
