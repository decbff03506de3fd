#!/usr/bin/env python3
"""Compression at CLI parity: abflip's chunked stream vs ``zstd -T0 --long=27 -<level>``.

    python3 bench/compress.py [--image IMG] [--level 9] [--variant CHUNK:WINDOW[:THREADS[:ldm]][@system] ...]
                              [--runs 1]

Both compress the same image from the page cache (one untimed read first), in the same run,
on all cores, runs interleaved (CLI, each variant, then again); medians are reported. Reported
per variant: compressed size, wall time and CPU time (user + system), each as a ratio to the
zstd CLI's (issue 25's goals, 2 cores: size <= 1.01x; time <= 0.8x with the defaults, <= 1.0x
with the wide window). ``default`` is the shipped defaults (``builder.compress``: 32 MiB chunks,
128 MiB window). A variant ending in ``@system`` compresses with the system's libzstd through
ctypes (Debian 12: 1.5.4) instead of ``backports.zstd``'s bundled one, as abflip did before
issue 25: the comparison of part 3 (without ``--variant``, both run). The default image is the
erofs image ``bench/apply.py`` caches in ``.bench/apply/rootfs.erofs``: when absent, it is built
with apply's defaults (1 GiB, /usr with 25 % long-range repeats, see ``bench/rootfs.py``); when
present, it is whatever apply last built there (its ``cache.json`` says what).
"""

from __future__ import annotations

import argparse
import ctypes
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


def run_abflip(image: Path, level: int, chunk: int, window: int, threads: int, ldm: bool, system: bool,
               out: Path) -> tuple[float, float, int, int]:
    saved = zstdlib.compress
    if system:
        zstdlib.compress = system_compress
    t0, c0 = time.monotonic(), _cpu(resource.RUSAGE_SELF)
    try:
        r = compress_image(image, out, level=level, chunk_size=chunk, window=window, threads=threads, ldm=ldm)
    finally:
        zstdlib.compress = saved
    return time.monotonic() - t0, _cpu(resource.RUSAGE_SELF) - c0, r.compressed_size, r.compression.window


def system_compress(data, prefix=None, *, level: int, window_log: int, ldm: bool = False, ldm_rate_log: int = 0,
                    checksum: bool = False) -> bytearray:
    """:func:`metadata.zstdlib.compress` through the system's libzstd (ctypes), as before issue 25."""
    lib, vp, size, cint = zstdlib.LIB, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
    if lib is None:
        raise SystemExit("no system libzstd (libzstd.so.1) for an @system variant")
    for fn, res, argt in (("ZSTD_createCCtx", vp, []), ("ZSTD_freeCCtx", size, [vp]),
                          ("ZSTD_CCtx_setParameter", size, [vp, cint, cint]),
                          ("ZSTD_CCtx_refPrefix", size, [vp, vp, size]),
                          ("ZSTD_compress2", size, [vp, vp, size, vp, size]), ("ZSTD_compressBound", size, [size])):
        getattr(lib, fn).restype, getattr(lib, fn).argtypes = res, argt
    check = zstdlib._check
    cctx = lib.ZSTD_createCCtx()
    try:  # zstd.h: compressionLevel 100, windowLog 101, enableLongDistanceMatching 160, contentSizeFlag 200, checksumFlag 201
        for param, value in ((100, level), (101, window_log), (160, int(ldm)), (200, 1), (201, int(checksum)),
                             (164, ldm_rate_log if ldm else 0)):  # 164: ldmHashRateLog (0: the default)
            check(lib.ZSTD_CCtx_setParameter(cctx, param, value))
        with zstdlib.address(data) as src:
            out = bytearray(lib.ZSTD_compressBound(src.len))
            with zstdlib.address(out, writable=True) as dst:
                if prefix is not None and len(prefix):
                    with zstdlib.address(prefix) as pre:
                        check(lib.ZSTD_CCtx_refPrefix(cctx, pre.ptr, pre.len))
                        n = check(lib.ZSTD_compress2(cctx, dst.ptr, dst.len, src.ptr, src.len))
                else:
                    n = check(lib.ZSTD_compress2(cctx, dst.ptr, dst.len, src.ptr, src.len))
        del out[n:]
        return out
    finally:
        lib.ZSTD_freeCCtx(cctx)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", type=Path)
    ap.add_argument("--level", type=int, default=9)
    ap.add_argument("--cli-level", type=int, default=None, help="the CLI's level (default: --level)")
    ap.add_argument("--variant", action="append", default=[],
                    help="CHUNK:WINDOW[:THREADS[:ldm]][@system], e.g. 32M:16M or 64M:128M:0 or default@system "
                         "(default: the shipped defaults with each library)")
    ap.add_argument("--runs", type=int, default=1, help="timed runs of each (median)")
    ap.add_argument("--tmp", type=Path, default=None, help="where the outputs go (default: next to the image)")
    args = ap.parse_args()
    image = args.image or default_image()
    cli_level = args.level if args.cli_level is None else args.cli_level
    variants = args.variant or ["default", "default@system"]
    size = image.stat().st_size
    print(f"image {image} ({size} bytes, {size / MIB:.0f} MiB), level {args.level}, {os.cpu_count()} CPUs; "
          f"libzstd: bundled {zstdlib.compressor_version()}, system "
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
            specs.append((chunk, window, threads, ldm, lib == "system"))
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
            for i, (chunk, window, threads, ldm, system) in enumerate(specs):
                t, c, var_n[i], var_used[i] = run_abflip(image, args.level, chunk, window, threads, ldm, system, out)
                var_t[i].append(t)
                var_c[i].append(c)
                print(f"  run {r + 1} abflip {variants[i]}: {var_n[i]} bytes, {t:.2f} s, cpu {c:.2f} s", flush=True)
        cli, clic = statistics.median(cli_t), statistics.median(cli_c)
        rows = [(f"zstd -T0 --long=27 -{cli_level}", cli_n, cli, clic)]
        for i, (chunk, window, threads, ldm, system) in enumerate(specs):
            name = (f"abflip level {args.level}, chunk {chunk // MIB} MiB, window {window // MIB} MiB"
                    + (f" (used {var_used[i] // MIB} MiB)" if var_used[i] != window else "")
                    + f", threads {threads or os.cpu_count()}" + (", ldm" if ldm else "")
                    + (", system libzstd (ctypes)" if system else ", backports.zstd"))
            rows.append((name, var_n[i], statistics.median(var_t[i]), statistics.median(var_c[i])))
    print()
    print("| variant | compressed bytes | size ratio | wall s | time ratio | CPU s | CPU ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, n, t, c in rows:
        print(f"| {name} | {n:,} | {n / cli_n:.4f}x | {t:.2f} | {t / cli:.2f}x | {c:.2f} | {c / clic:.2f}x |")
    name, n, t, c = rows[1]
    print(f"compress/cli: size {n / cli_n:.4f}x, time {t / cli:.2f}x, cpu {c / clic:.2f}x ({name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
