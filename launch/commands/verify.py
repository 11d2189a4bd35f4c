"""`zeroforge verify STORE`: exit 0 when every checksum and invariant holds, 1 naming each fault."""

from __future__ import annotations

import argparse
import sys

from zeroforge.data_prep.verify import verify_store


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="token store: a directory or s3://BUCKET/PREFIX")


def run(args) -> int:
    problems = verify_store(args.store)
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"OK {args.store}")
    return 0
