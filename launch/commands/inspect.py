"""`zeroforge inspect STORE [--json]`: what a store holds."""

from __future__ import annotations

import argparse
import json

from zeroforge.data_prep.cache import CacheOptions
from zeroforge.data_prep.storage import StorageError
from zeroforge.data_prep.store import StoreError, TokenStore, describe
from zeroforge.pipeline.errors import EXIT_FAILED, reported_as


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="token store: a directory or s3://BUCKET/PREFIX")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args) -> int:
    with reported_as(EXIT_FAILED, StoreError, StorageError):
        store = TokenStore.open(args.store, check_shards=False, cache=CacheOptions(disk=False))
        info = describe(store)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    tok = info["tokenizer"]
    print(f"store       {info['path']}  ({info['format']})")
    print(f"tokenizer   {tok['name']}  vocab {tok['vocab_size']}  eot {tok['eot_id']}  dtype {info['dtype']}")
    examples = info["examples"]
    if examples is not None:
        template = examples["template"]["name"] if examples["template"] else "none"
        print(f"examples    {examples['format']}  template {template}  "
              f"max {examples['max_tokens']} tokens")
    for name, c in info["splits"].items():
        loss = f"  {c['loss_tokens']:>12,} loss tokens" if "loss_tokens" in c else ""
        print(f"split       {name:<5}  {c['docs']:>12,} docs  {c['tokens']:>15,} tokens{loss}")
    skipped = info["skipped"]
    reasons = ", ".join(f"{k}: {v}" for k, v in skipped["by_reason"].items())
    print(f"skipped     {skipped['total']:,} records" + (f"  ({reasons})" if reasons else ""))
    if info["size_bytes"] is not None:
        where = "stored" if store.storage.remote else "on disk"
        print(f"size        {info['size_bytes'] / 1e6:,.1f} MB {where}  (codec {info['layout']['codec']})")
    print(f"fingerprint {info['fingerprint']}")
    return 0
