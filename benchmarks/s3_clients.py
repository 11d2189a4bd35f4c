"""Which S3 client the token store uses: obstore vs s3fs, measured against one local S3 server.

    pip install s3fs        # not a zeroforge dependency; obstore is
    python benchmarks/s3_clients.py [--gets 300]

Starts moto's S3 server on 127.0.0.1, puts a 256 KiB object and a 4 MiB one, and times ranged
GETs of one inner chunk (128 KiB + its CRC) at random offsets through each client, in the same
run, interleaved: wall time per GET and the client process's own CPU time per GET (what the
training ranks' data thread would take from them). Also: import time, and whether each client
offers the conditional puts the build claims need (create-only, and If-Match on an ETag).
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.helpers: the S3 server

from tests.helpers.s3_server import running_s3_server  # noqa: E402

CHUNK = 128 * 1024 + 4


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _import_time(module: str) -> float:
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True).stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gets", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with running_s3_server(Path(tempfile.mkdtemp(prefix="zf-bench-s3c-"))) as server:
        os.environ.update(server.env)
        bucket = server.new_bucket()[len("s3://"):]
        import obstore
        import s3fs
        from obstore.store import S3Store

        store = S3Store(bucket, endpoint=server.endpoint, region="us-east-1",
                        client_options={"allow_http": True})
        fs = s3fs.S3FileSystem()
        print(f"import: obstore {_import_time('obstore.store'):.3f} s, s3fs {_import_time('s3fs'):.3f} s")
        print(f"{'object':>8} {'client':<8} {'wall ms/GET':>12} {'client CPU ms/GET':>18}")
        for size in (256 * 1024, 4 * 2**20):
            obstore.put(store, f"o{size}", os.urandom(size))
            clients = {
                "obstore": lambda o, s=size: bytes(obstore.get_range(store, f"o{s}", start=o,
                                                                     length=CHUNK)),
                "s3fs": lambda o, s=size: fs.cat_file(f"{bucket}/o{s}", start=o, end=o + CHUNK),
            }
            totals = {name: [0.0, 0.0] for name in clients}
            rng = random.Random(0)
            for _ in range(args.rounds):
                for name, get in clients.items():
                    offsets = [rng.randrange(size - CHUNK) for _ in range(args.gets)]
                    c, t = _cpu(), time.perf_counter()
                    for o in offsets:
                        get(o)
                    totals[name][0] += time.perf_counter() - t
                    totals[name][1] += _cpu() - c
            n = args.gets * args.rounds
            for name, (wall, cpu) in totals.items():
                print(f"{size >> 10:>6}Ki {name:<8} {wall / n * 1e3:>12.2f} {cpu / n * 1e3:>18.2f}")
        obstore.put(store, "claim", b"a", mode="create")
        try:
            obstore.put(store, "claim", b"b", mode="create")
            print("obstore create-only: NOT enforced")
        except Exception as exc:  # noqa: BLE001 -- the point is which error
            print(f"obstore create-only: refused ({type(exc).__name__})")
        etag = obstore.head(store, "claim")["e_tag"]
        obstore.put(store, "claim", b"c", mode={"e_tag": etag})
        try:
            obstore.put(store, "claim", b"d", mode={"e_tag": etag})
            print("obstore If-Match: NOT enforced")
        except Exception as exc:  # noqa: BLE001
            print(f"obstore If-Match on a stale ETag: refused ({type(exc).__name__})")
        fs.pipe_file(f"{bucket}/claim2", b"a", mode="create")
        try:
            fs.pipe_file(f"{bucket}/claim2", b"b", mode="create")
            print("s3fs create-only: NOT enforced")
        except Exception as exc:  # noqa: BLE001
            print(f"s3fs create-only: refused ({type(exc).__name__}); If-Match: no API")


if __name__ == "__main__":
    main()
