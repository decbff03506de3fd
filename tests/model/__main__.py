"""``python -m tests.model [--depth N] [--no-cuts] [--max-cuts K]``: explore the lifecycle and
print what was explored and every violation (exit 1 if any)."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from .checker import explore
from .world import build_releases


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.model")
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--no-cuts", action="store_true", help="no power cuts inside verbs")
    ap.add_argument("--cut-depth", type=int, default=2, help="power cuts inside the verbs from the first N levels")
    ap.add_argument("--recovery", type=int, default=2, help="events explored after each power cut")
    ap.add_argument("--max-cuts", type=int, default=0, help="cut at the first K writes and the last (0: every write)")
    args = ap.parse_args()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="abflip-model-releases-") as d:
        releases = build_releases(Path(d))
        c = explore(releases, depth=args.depth, cuts=not args.no_cuts, cut_depth=args.cut_depth,
                    recovery=args.recovery, max_cuts=args.max_cuts,
                    progress=lambda s: print(s, flush=True))
    for v in c.violations:
        print("VIOLATION:", v)
    print(f"model: {c.states} states, {c.transitions} transitions to depth {args.depth}, {len(c.violations)} "
          f"violations, {time.monotonic() - t0:.0f} s")
    print("events:", ", ".join(f"{k} {n}" for k, n in sorted(c.by_event.items())))
    return 1 if c.violations else 0


if __name__ == "__main__":
    sys.exit(main())
