#!/usr/bin/env python3
"""Compression at CLI parity: abflip's chunked stream vs ``zstd -T0 --long=27 -<level>``.

    python3 bench/compress.py [--image IMG] [--level 5] [--cli-level 9] [--runs 1]
                              [--variant CHUNK:WINDOW[:THREADS[:ldm]][@system|@api] ...] [--verity]

Both compress the same image from the page cache (one untimed read first), in the same run,
on all cores, runs interleaved (CLI, each variant, then again); medians are reported. Reported
per variant: compressed size, wall time and CPU time (user + system), each as a ratio to the
zstd CLI's (issue 25's goals, 2 cores: size <= 1.01x; time <= 0.8x with the defaults, <= 1.0x
with the wide window), and the process's peak RSS so far. ``default`` is the shipped defaults
(``builder.compress``: 64 MiB chunks, 128 MiB window). Each variant compresses through
``metadata.zstdlib.compress`` with the libzstd ``backports.zstd`` bundles (ctypes, the prefix
referenced in place); ``@system`` with the system's libzstd (Debian 12: 1.5.4) through the same
binding, as abflip did before issue 25; ``@api`` through ``backports.zstd``'s own API (Python
3.14's ``compression.zstd``: the prefix copied into a ``ZstdDict``). Without ``--variant`` the
defaults run with each of the three (issue 25, part 3). The default image is the erofs image
``bench/apply.py`` caches in ``.bench/apply/rootfs.erofs``: when absent, it is built with apply's
defaults (1 GiB, /usr with 25 % long-range repeats, see ``bench/rootfs.py``); when present, it is
whatever apply last built there (its ``cache.json`` says what).

``--verity`` (issue 22) also runs each variant as ``release create --verity`` does it, right after it: the dm-verity
hash tree (builder/verity.py) computed in a thread beside the image's chunks, the image and the tree compressed as
one stream (``builder.release.compress_with_tree``); a last line per variant gives
its wall and CPU time as a ratio to the same variant without the tree (goal: <= 1.10x).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from builder import compress  # noqa: E402
from builder.compress import compress_image  # noqa: E402
from metadata import zstdlib  # noqa: E402

MIB = 1 << 20


def parse_size(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1 << 10, "M": MIB, "G": 1 << 30}.get(s[-1:], 1)
    return int(s[:-1] if s[-1:] in "KMG" else s) * mult


def default_image() -> Path:
    img = ROOT / ".bench" / "apply" / "rootfs.erofs"
    if not img.is_file():
        print("bench: building the 1 GiB image with bench/apply.py's builder ...", file=sys.stderr)
        sys.path.insert(0, str(ROOT / "bench"))
        import apply  # type: ignore[import-not-found]

        work = ROOT / ".bench" / "apply"
        work.mkdir(parents=True, exist_ok=True)
        apply.ensure_image(work, 1024, apply.Cache.load(work / "cache.json"), keep_tree=False)
    return img


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(16 * MIB):
            pass


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def run_cli(image: Path, level: int, out: Path) -> tuple[float, float, int]:
    t0, c0 = time.monotonic(), _cpu(resource.RUSAGE_CHILDREN)
    subprocess.run(["zstd", "-q", "-f", "-T0", f"-{level}", "--long=27", str(image), "-o", str(out)], check=True)
    return time.monotonic() - t0, _cpu(resource.RUSAGE_CHILDREN) - c0, out.stat().st_size


def run_abflip(image: Path, level: int, chunk: int, window: int, threads: int, ldm: bool, library: str,
               out: Path, verity: bool = False) -> tuple[float, float, int, int]:
    from builder.release import compress_with_tree
    from builder.verity import default_salt

    tail = out.with_name("rootfs.verity")
    tail.unlink(missing_ok=True)
    zstdlib.compress = LIBRARIES[library][1]
    t0, c0 = time.monotonic(), _cpu(resource.RUSAGE_SELF)
    try:
        options = dict(level=level, chunk_size=chunk, window=window, threads=threads, ldm=ldm)
        if verity:  # as release create --verity: the tree beside the image's chunks
            r = compress_with_tree(image, out, tail, default_salt("bench"), **options)[1]
        else:
            r = compress_image(image, out, **options)
    finally:
        zstdlib.compress = ORIGINAL
    return time.monotonic() - t0, _cpu(resource.RUSAGE_SELF) - c0, r.compressed_size, r.compression.window


def system_compress(data, prefix=None, **kw) -> bytearray:
    """:func:`metadata.zstdlib.compress` with the system's libzstd, as before issue 25."""
    if zstdlib.LIB is None:
        raise SystemExit("no system libzstd (libzstd.so.1) for an @system variant")
    return ORIGINAL(data, prefix, lib=zstdlib.with_compression(zstdlib.LIB), **kw)


def api_compress(data, prefix=None, *, level: int, window_log: int, ldm: bool = False, ldm_rate_log: int = 0,
                 checksum: bool = False) -> bytes:
    """The same frame through ``backports.zstd``'s own API (Python 3.14's ``compression.zstd``):
    the prefix copied into a ``ZstdDict`` per frame."""
    from backports import zstd

    p = zstd.CompressionParameter
    options = {p.compression_level: level, p.window_log: window_log, p.enable_long_distance_matching: int(ldm),
               p.content_size_flag: 1, p.checksum_flag: int(checksum)}
    if ldm and ldm_rate_log:
        options[p.ldm_hash_rate_log] = ldm_rate_log
    zd = zstd.ZstdDict(prefix, is_raw=True).as_prefix if prefix is not None and len(prefix) else None
    c = zstd.ZstdCompressor(options=options, zstd_dict=zd)
    c.set_pledged_input_size(len(data))
    return c.compress(data, mode=zstd.ZstdCompressor.FLUSH_FRAME)


ORIGINAL = zstdlib.compress
LIBRARIES = {"": ("the bundled libzstd (ctypes)", ORIGINAL), "system": ("the system's libzstd (ctypes)", system_compress),
             "api": ("backports.zstd's API", api_compress)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", type=Path)
    ap.add_argument("--level", type=int, default=compress.DEFAULT_LEVEL, help="abflip's level (default: the builder's)")
    ap.add_argument("--cli-level", type=int, default=9, help="the CLI's level (the baseline: -9 --long=27)")
    ap.add_argument("--variant", action="append", default=[],
                    help="CHUNK:WINDOW[:THREADS[:ldm]][@system|@api], e.g. 32M:16M or 64M:128M:0 or default@system "
                         "(default: the shipped defaults with each library)")
    ap.add_argument("--runs", type=int, default=1, help="timed runs of each (median)")
    ap.add_argument("--tmp", type=Path, default=None, help="where the outputs go (default: next to the image)")
    ap.add_argument("--verity", action="store_true", help="also each variant with the dm-verity tree (release create "
                                                         "--verity): its time as a ratio to the variant's without")
    args = ap.parse_args()
    image = args.image or default_image()
    cli_level = args.cli_level
    variants = args.variant or ["default", "default@api", "default@system"]
    size = image.stat().st_size
    print(f"image {image} ({size} bytes, {size / MIB:.0f} MiB), level {args.level}, {os.cpu_count()} CPUs; "
          f"libzstd: compressor {zstdlib.compressor_version()}, system "
          f"{'none' if zstdlib.LIB is None else zstdlib.LIB.ZSTD_versionNumber()}", flush=True)
    warm(image)
    with tempfile.TemporaryDirectory(dir=args.tmp or image.parent, prefix=".bench-compress-") as tmp:
        out = Path(tmp) / "out.zst"
        from builder.compress import DEFAULT_CHUNK, DEFAULT_LDM, DEFAULT_THREADS, DEFAULT_WINDOW

        specs = []
        for v in variants:
            v, _, lib = v.partition("@")
            chunk, window, threads, ldm = DEFAULT_CHUNK, DEFAULT_WINDOW, DEFAULT_THREADS, DEFAULT_LDM
            if v != "default":
                parts = v.split(":")
                chunk, window = parse_size(parts[0]), parse_size(parts[1])
                threads = int(parts[2]) if len(parts) > 2 else 0
                ldm = len(parts) > 3 and parts[3] == "ldm"
            if lib not in LIBRARIES:
                ap.error(f"unknown library @{lib}: use @system or @api")
            specs.append((chunk, window, threads, ldm, lib, False))
            if args.verity:
                specs.append((chunk, window, threads, ldm, lib, True))
        if args.verity:
            variants = [v + suffix for v in variants for suffix in ("", " --verity")]
        # interleaved runs (cli, variant 1, variant 2, ... then again), so load changes hit all alike
        cli_t: list[float] = []
        cli_c: list[float] = []
        cli_n = 0
        var_t: list[list[float]] = [[] for _ in specs]
        var_c: list[list[float]] = [[] for _ in specs]
        var_n = [0] * len(specs)
        var_used = [0] * len(specs)
        for r in range(args.runs):
            t, c, cli_n = run_cli(image, cli_level, out)
            cli_t.append(t)
            cli_c.append(c)
            print(f"  run {r + 1} cli: {cli_n} bytes, {t:.2f} s, cpu {c:.2f} s", flush=True)
            for i, (chunk, window, threads, ldm, lib, verity) in enumerate(specs):
                t, c, var_n[i], var_used[i] = run_abflip(image, args.level, chunk, window, threads, ldm, lib, out,
                                                         verity)
                var_t[i].append(t)
                var_c[i].append(c)
                print(f"  run {r + 1} abflip {variants[i]}: {var_n[i]} bytes, {t:.2f} s, cpu {c:.2f} s", flush=True)
        cli, clic = statistics.median(cli_t), statistics.median(cli_c)
        rows = [(f"zstd -T0 --long=27 -{cli_level}", cli_n, cli, clic)]
        for i, (chunk, window, threads, ldm, lib, verity) in enumerate(specs):
            name = (f"abflip level {args.level}, chunk {chunk // MIB} MiB, window {window // MIB} MiB"
                    + (f" (used {var_used[i] // MIB} MiB)" if var_used[i] != window else "")
                    + f", threads {threads or os.cpu_count()}" + (", ldm" if ldm else "") + f", {LIBRARIES[lib][0]}"
                    + (", --verity" if verity else ""))
            rows.append((name, var_n[i], statistics.median(var_t[i]), statistics.median(var_c[i])))
    print()
    print("| variant | compressed bytes | size ratio | wall s | time ratio | CPU s | CPU ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, n, t, c in rows:
        print(f"| {name} | {n:,} | {n / cli_n:.4f}x | {t:.2f} | {t / cli:.2f}x | {c:.2f} | {c / clic:.2f}x |")
    name, n, t, c = rows[1]
    print(f"compress/cli: size {n / cli_n:.4f}x, time {t / cli:.2f}x, cpu {c / clic:.2f}x ({name})")
    for (name, n, t, c), (_, vn, vt, vc) in zip(rows[1::2], rows[2::2]) if args.verity else ():
        print(f"verity/plain: time {vt / t:.3f}x, cpu {vc / c:.3f}x, size {vn / n:.4f}x ({name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
