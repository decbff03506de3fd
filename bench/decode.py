#!/usr/bin/env python3
"""Benchmark: the device's decoder, the system's libzstd through ctypes vs ``backports.zstd``.

    python3 bench/decode.py [--release DIR] [--runs 3]

Issue 25, part 3: should the device decode with ``backports.zstd`` (Python 3.14's
``compression.zstd``) instead of ``metadata.zstdlib``'s ctypes binding? Both decode the same
release's chained frames (default: the one ``bench/apply.py`` caches in ``.bench/apply``) from
the page cache into a scratch file, each chunk's dictionary (the ``window`` image bytes before
it) mapped from that file, each in a process of its own, alternated, ``--runs`` times (median):

- *ctypes*: ``metadata.zstdlib.Decoder``, as ``applier.stream`` decodes: straight into one
  output buffer (``ZSTD_d_stableOutBuffer``), the prefix referenced where it lies (the mapping);
- *backports.zstd*: ``ZstdDecompressor(zstd_dict=ZstdDict(prefix, is_raw=True).as_prefix)`` and
  ``decompress(data, max_length=...)``: the prefix copied into the ``ZstdDict``, the output
  returned as new bytes from the decoder's own window buffer.

Reported: CPU seconds (user + system), peak RSS (``ru_maxrss``) and the sampled peaks of
``RssAnon`` (what the kernel cannot reclaim) and ``RssFile``; the output is checked against the
image's sha256. Nothing is hashed per chunk and nothing is downloaded: the decoders alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MIB = 1 << 20
READ_IN = 1 << 20  # compressed bytes fed at a time, as applier.stream
SLICE = 4 << 20  # decompressed bytes asked of backports.zstd at a time


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def decode(release: Path, variant: str, out_path: Path) -> dict:
    """Decode the release's stream into ``out_path`` with ``variant``; runs in its own process."""
    from metadata import zstdlib
    from metadata.manifest import Release

    image = Release.from_bytes((release / "release.json").read_bytes()).image
    peak = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            for k in peak:
                peak[k] = max(peak[k], _status(k))

    sampler = threading.Thread(target=sample, daemon=True)
    with open(release / "rootfs.img.zst", "rb") as src, open(out_path, "w+b") as out:
        out.truncate(image.size)
        stream = mmap.mmap(src.fileno(), 0, access=mmap.ACCESS_READ)
        sampler.start()
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        window = image.compression.window
        if variant == "ctypes":
            decoder = zstdlib.Decoder(27)
            buf = bytearray(max(c.out_length for c in image.chunks))
        else:
            from backports import zstd
        for ch in image.chunks:
            lo = max(0, ch.out_offset - window) if window else ch.out_offset
            frame = memoryview(stream)[ch.offset:ch.offset + ch.length]
            pm = mmap.mmap(out.fileno(), ch.out_offset, access=mmap.ACCESS_READ) if ch.out_offset > lo else None
            prefix = memoryview(pm)[lo:ch.out_offset] if pm is not None else None
            if variant == "ctypes":
                view = memoryview(buf)[:ch.out_length]
                decoder.start(view, prefix)
                for k in range(0, ch.length, READ_IN):
                    decoder.feed(frame[k:k + READ_IN])
                decoder.end()
                assert decoder.done() and decoder.produced == ch.out_length
                os.pwrite(out.fileno(), view, ch.out_offset)
                del view
            else:
                zd = zstd.ZstdDict(prefix, is_raw=True).as_prefix if prefix is not None else None
                d = zstd.ZstdDecompressor(zstd_dict=zd, options={zstd.DecompressionParameter.window_log_max: 27})
                at, data = ch.out_offset, frame
                while not d.eof:
                    piece = d.decompress(data, max_length=SLICE)
                    data = b""
                    os.pwrite(out.fileno(), piece, at)
                    at += len(piece)
                assert at == ch.out_offset + ch.out_length
                del d, zd, piece
            del frame, prefix
            if pm is not None:
                pm.close()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        done.set()
        sampler.join()
        stream.close()
        out.seek(0)
        h = hashlib.sha256()
        while b := out.read(16 * MIB):
            h.update(b)
    return {"cpu": r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, "maxrss": r1.ru_maxrss * 1024,
            "anon": peak["RssAnon"], "file": peak["RssFile"], "ok": h.hexdigest() == image.sha256}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--release", type=Path, default=ROOT / ".bench" / "apply" / "release-2.0.0")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(decode(a.release, a.child[0], Path(a.child[1]))))
        return 0
    from metadata import zstdlib
    from metadata.manifest import Release

    image = Release.from_bytes((a.release / "release.json").read_bytes()).image
    c = image.compression
    print(f"release {a.release}: {image.size} bytes, {len(image.chunks)} chunks of {c.chunk_size >> 20} MiB, "
          f"{c.window >> 20} MiB window; libzstd: system {zstdlib.LIB.ZSTD_versionNumber() if zstdlib.LIB else 'none'}, "
          f"backports.zstd {zstdlib.compressor_version()}", flush=True)
    runs: dict[str, list[dict]] = {"ctypes": [], "backports.zstd": []}
    with tempfile.TemporaryDirectory(dir=a.release.parent, prefix=".bench-decode-") as tmp:
        for i in range(a.runs):
            for v in runs:
                p = subprocess.run([sys.executable, __file__, "--release", str(a.release), "--child", v,
                                    str(Path(tmp) / "out.img")], capture_output=True, text=True)
                if p.returncode:
                    raise SystemExit(p.stderr)
                r = json.loads(p.stdout)
                runs[v].append(r)
                print(f"  run {i + 1} {v}: cpu {r['cpu']:.2f} s, peak RSS {r['maxrss'] / MIB:.1f} MiB, anon "
                      f"{r['anon'] / MIB:.1f}, file {r['file'] / MIB:.1f}, sha256 {'ok' if r['ok'] else 'MISMATCH'}",
                      flush=True)
    med = {v: {k: statistics.median(r[k] for r in rs) for k in ("cpu", "maxrss", "anon", "file")}
           for v, rs in runs.items()}
    print("\n| decoder | CPU s | peak RSS MiB | RssAnon MiB | RssFile MiB |\n|---|---:|---:|---:|---:|")
    for v, m in med.items():
        print(f"| {v} | {m['cpu']:.2f} | {m['maxrss'] / MIB:.1f} | {m['anon'] / MIB:.1f} | {m['file'] / MIB:.1f} |")
    b, t = med["backports.zstd"], med["ctypes"]
    print(f"decode backports/ctypes: cpu {b['cpu'] / t['cpu']:.2f}x, peak RSS {b['maxrss'] / t['maxrss']:.2f}x, "
          f"anon {b['anon'] / t['anon']:.2f}x")
    return 0 if all(r["ok"] for rs in runs.values() for r in rs) else 1


if __name__ == "__main__":
    sys.exit(main())
