#!/usr/bin/env python3
"""Upload throughput to S3: abflip's ``S3Storage.put_file`` vs ``aws s3 cp``, same file, same server.

    python3 bench/publish.py [--file FILE] [--runs 3] [--part-size 8M] [--concurrency 10]

The server is a local ``moto_server`` on 127.0.0.1 started by this script (both clients talk
HTTP to it with the same dummy credentials); the file defaults to the 1 GiB image cached by
``bench/apply.py`` (``.bench/apply/rootfs.erofs``). Runs alternate between the two clients;
after one untimed warm-up upload, the median wall time of each is reported (goal: abflip >= 1.0x the CLI's throughput). The
AWS CLI is installed with pip when it is missing. Each object is deleted after its run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

MIB = 1 << 20
ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def parse_size(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1 << 10, "M": MIB, "G": 1 << 30}.get(s[-1:], 1)
    return int(s[:-1] if s[-1:] in "KMG" else s) * mult


def ensure_aws() -> str:
    aws = shutil.which("aws")
    if aws and subprocess.run([aws, "--version"], capture_output=True).returncode == 0:
        return aws
    print("bench: installing awscli with pip ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "awscli"], check=True)
    aws = shutil.which("aws")
    if not aws:
        sys.exit("bench: aws not found after pip install awscli")
    return aws


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", type=Path, default=ROOT / ".bench" / "apply" / "rootfs.erofs")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--part-size", default="8M")
    ap.add_argument("--concurrency", type=int, default=10)
    args = ap.parse_args()
    if not args.file.is_file():
        sys.exit(f"bench: {args.file} is missing (run bench/apply.py once, or pass --file)")
    os.environ.update(ENV)
    aws = ensure_aws()
    from s3server import MotoServer

    from builder.storage.s3 import S3Storage

    size = args.file.stat().st_size
    server = MotoServer(env=ENV)
    try:
        bucket = server.new_bucket(public=False)
        storage = S3Storage.from_url(f"s3://{bucket}/bench", endpoint_url=server.endpoint, region="us-east-1",
                                     part_size=parse_size(args.part_size), max_concurrency=args.concurrency)
        cli_version = subprocess.run([aws, "--version"], capture_output=True, text=True).stdout.strip()
        print(f"file {args.file} ({size} bytes), moto_server at {server.endpoint}; {cli_version}", flush=True)
        with open(args.file, "rb") as f:  # warm the page cache
            while f.read(16 * MIB):
                pass
        # one untimed upload first: the server's first large object costs it extra (allocation)
        storage.put_file("warmup.img", args.file, content_type="application/octet-stream", cache_control="no-store")
        storage.delete("warmup.img")
        times: dict[str, list[float]] = {"abflip": [], "aws": []}
        for i in range(args.runs):
            for who in (("abflip", "aws") if i % 2 == 0 else ("aws", "abflip")):
                key = f"bench/{who}-{i}.img"
                t0 = time.monotonic()
                if who == "abflip":
                    storage.put_file(f"{who}-{i}.img", args.file, content_type="application/octet-stream",
                                     cache_control="no-store")
                else:
                    subprocess.run([aws, "s3", "cp", "--quiet", "--endpoint-url", server.endpoint, str(args.file),
                                    f"s3://{bucket}/{key}"], check=True, env=dict(os.environ, **ENV))
                dt = time.monotonic() - t0
                times[who].append(dt)
                head = storage.head(f"{who}-{i}.img")
                assert head and head["length"] == size, head
                storage.delete(f"{who}-{i}.img")
                print(f"  run {i + 1} {who}: {dt:.2f} s ({size / dt / MIB:.0f} MiB/s)", flush=True)
    finally:
        server.stop()
    aws_t, ab_t = statistics.median(times["aws"]), statistics.median(times["abflip"])
    print()
    print(f"| client | median s | MiB/s | throughput vs aws |")
    print("|---|---:|---:|---:|")
    print(f"| `aws s3 cp` (defaults: 8 MiB parts, 10 threads) | {aws_t:.2f} | {size / aws_t / MIB:.0f} | 1.00x |")
    print(f"| abflip `S3Storage.put_file` ({args.part_size} parts, {args.concurrency} threads) | {ab_t:.2f} | "
          f"{size / ab_t / MIB:.0f} | {aws_t / ab_t:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
