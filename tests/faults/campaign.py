"""The fault campaign: every device command, from every state it can start in, killed or
failed (EIO, ENOSPC) at each file-changing system call, then power-cycled and checked;
plus the power-cut crash states of each clean run (:mod:`tests.faults.crash`).

    python3 -m tests.faults.campaign [--full | --sample N] [--seed S] [--jobs J] [--only ID ...]

Prints a table per command and state and ``N faults, M violations``; writes the summary and
every violation (with the command that reproduces it) to ``/tmp/faults/latest.txt``.
Trial ids: ``<command>@<state>:<kind>:<syscall>:<n>`` (kind kill, EIO, ENOSPC),
``<command>@<state>:crash:<point>:<model>``, ``<command>@<state>:clean``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import pickle
import random
import re
import shutil
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import check, crash, trace
from .world import ONLY, STATES, Releases, account, build_releases, make_server, make_snapshots, set_trial_url

OUT = Path("/tmp/faults")
LATEST = OUT / "latest.txt"
# Trials on tmpfs when there is one: fsync costs nothing there, and strace injects at the
# system call whatever the file system.
WORK = Path("/dev/shm/abflip-faults") if Path("/dev/shm").is_dir() else OUT / "run"
COMMANDS = tuple(trace.COMMANDS)


@dataclass
class Scenario:
    command: str
    state: str

    @property
    def name(self) -> str:
        return f"{self.command}@{self.state}"

    @property
    def goal(self) -> str:
        return "rollback" if self.command == "rollback" or self.state == "rollback-requested" else "update"


@dataclass
class Baseline:
    scenario: Scenario
    rc: int
    sites: list[tuple[str, int]]
    signature: dict
    boot_slot: str | None
    ops_file: str
    problems: list[str] = field(default_factory=list)


@dataclass
class Ctx:
    """What a worker needs (picklable)."""

    rel: Releases
    base_url: str
    work: Path
    snaps: dict[str, Path]
    pre_slot: dict[str, str | None]
    keep: bool = False


@dataclass
class Result:
    id: str
    scenario: str
    kind: str
    problems: list[str]
    miss: bool = False
    seconds: float = 0.0


def _tid(s: str) -> str:
    return hashlib.sha1(s.encode()).hexdigest()[:12]


# -- the clean run of a scenario: count the fault sites, record the operations -------------
def baseline(ctx: Ctx, sc: Scenario) -> Baseline:
    d = ctx.work / "base" / sc.name
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(ctx.snaps[sc.state], d, symlinks=True)
    tid = _tid(sc.name + ":base")
    set_trial_url(d, ctx.base_url, tid)
    r = trace.run(sc.command, d, d.parent / f"{sc.name}.log", strsize=65536)
    sites = [(c.name, c.nth) for c in trace.sites(r, d)]
    problems = []
    if r.rc != 0 and ("Traceback" in r.stderr or "error (" not in r.stderr):
        problems.append(f"the clean run exits {r.rc} without a clean error: {_last(r.stderr)}")
    sig = check.signature(d)
    ops = crash.ops_from_calls(r.calls, d, ctx.snaps[sc.state], d)
    ops_file = ctx.work / "base" / f"{sc.name}.ops"
    ops_file.write_bytes(pickle.dumps(ops))
    probe = ctx.work / "base" / f"{sc.name}.boot"
    shutil.rmtree(probe, ignore_errors=True)
    shutil.copytree(d, probe, symlinks=True)
    out, _ = check.power_cycle(probe)
    shutil.rmtree(probe, ignore_errors=True)
    account(ctx.base_url, tid)
    return Baseline(sc, r.rc, sites, sig, out.slot if out else None, str(ops_file), problems)


def _last(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1][:200] if lines else "(no output)"


# -- one trial ---------------------------------------------------------------------------
def image_received(r: trace.Run) -> list[tuple[int, int]]:
    """[start, end) of the compressed image the faulted run received (from its recvfrom calls)."""
    cur: dict[int, list[int]] = {}  # fd -> [start, received, header_pending]
    spans: list[tuple[int, int]] = []
    for c in r.calls:
        if c.name == "sendto" and c.ret and c.ret > 0:
            data = c.string(1) or b""
            m = re.match(rb"GET (\S+) HTTP", data)
            if m is None:
                continue
            fd = trace_fd(c)
            if m.group(1).endswith(b".zst"):
                rng = re.search(rb"\r\nRange: bytes=(\d+)-", data)
                cur[fd] = [int(rng.group(1)) if rng else 0, 0, 1]
            else:
                cur.pop(fd, None)
        elif c.name == "recvfrom" and c.ret and c.ret > 0:
            fd = trace_fd(c)
            if fd in cur:
                n = c.ret
                if cur[fd][2]:
                    data = c.string(1) or b""
                    cut = data.find(b"\r\n\r\n")
                    if cut >= 0:
                        n -= cut + 4
                        cur[fd][2] = 0
                    else:
                        n = 0
                cur[fd][1] += n
    for start, got, _ in cur.values():
        if got:
            spans.append((start, start + got))
    return spans


def trace_fd(c: trace.Call) -> int:
    try:
        return int(c.args[0].split("<", 1)[0])
    except ValueError:
        return -1


def refetched(spans: list[tuple[int, int]], starts: list[int], total: int) -> int:
    """Bytes of ``spans`` (received by the faulted run) that later requests asked for again."""
    if not starts or not spans:
        return 0
    lo = min(starts)
    return sum(max(0, min(e, total) - max(s, lo)) for s, e in spans)


def run_trial(ctx: Ctx, b: Baseline, spec: tuple) -> Result:
    t0 = time.monotonic()
    sc = b.scenario
    kind = spec[0]
    rid = f"{sc.name}:" + ":".join(str(x) for x in spec)
    tid = _tid(rid)
    d = ctx.work / "t" / tid
    shutil.rmtree(d, ignore_errors=True)
    d.parent.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    spans: list[tuple[int, int]] = []
    rc = None
    if kind == "crash":
        ops = pickle.loads(Path(b.ops_file).read_bytes())
        keep = dict((f"{k}:{m}", s) for k, m, s in crash.crash_sets(ops)).get(f"{spec[1]}:{spec[2]}")
        if keep is None:
            return Result(rid, sc.name, kind, [], miss=True)
        crash.materialize(ctx.snaps[sc.state], ops, keep, d)
        set_trial_url(d, ctx.base_url, tid)
    else:
        shutil.copytree(ctx.snaps[sc.state], d, symlinks=True)
        set_trial_url(d, ctx.base_url, tid)
        fault = None if kind == "clean" else (spec[1], int(spec[2]), kind)
        r = trace.run(sc.command, d, d.parent / f"{tid}.log", fault=fault, strsize=4096)
        Path(d.parent / f"{tid}.log").unlink(missing_ok=True)
        if fault is not None:
            hit = [c for c in r.calls if c.pid == r.main_pid and c.name == fault[0] and c.nth == fault[1]]
            landed = bool(hit) and trace.is_site(hit[0], str(d)) and \
                (hit[0].injected if kind != "kill" else (r.rc in (-9, 137) and hit[0].ret is None))
            if not landed:
                shutil.rmtree(d, ignore_errors=True)
                account(ctx.base_url, tid)
                return Result(rid, sc.name, kind, [], miss=True, seconds=time.monotonic() - t0)
        rc = r.rc
        killed = rc in (-9, 137)
        if "Traceback" in r.stderr:
            problems.append(f"{sc.command} printed a Traceback (exit {rc}): {_last(r.stderr)}")
        elif rc != 0 and not killed and not re.search(r"^error \(\w+\): ", r.stderr, re.M):
            problems.append(f"{sc.command} exit {rc} without a clean error: {_last(r.stderr)}")
        if rc == 1:
            problems.append(f"{sc.command} exit 1 (internal error)")
        if rc == 0:
            sig = check.signature(d)
            diff = {k: (b.signature.get(k), v) for k, v in sig.items() if b.signature.get(k) != v and k != "entries"}
            if b.rc != 0:
                problems.append(f"{sc.command} exit 0 under a fault, where the clean run exits {b.rc}")
            elif diff:
                problems.append(f"{sc.command} exit 0 but its effect differs from a clean run: "
                                + ", ".join(f"{k} {x!r} (clean {y!r})" for k, (y, x) in diff.items()))
        spans = image_received(r)
    account(ctx.base_url, tid)

    out, p = check.power_cycle(d)
    problems += p
    _, p = check.booted_image(d, out, ctx.rel)
    problems += p
    if out is not None and rc is not None:
        if rc not in (0, -9, 137) and out.slot != ctx.pre_slot[sc.state]:
            problems.append(f"{sc.command} exit {rc} (an error) but the device now boots slot {out.slot} "
                            f"(slot {ctx.pre_slot[sc.state]} before)")
        if rc == 0 and b.rc == 0 and out.slot != b.boot_slot:
            problems.append(f"{sc.command} exit 0 but the device boots slot {out.slot} (a clean run: {b.boot_slot})")
    problems += check.persisted(d)
    agent = check.Agent(d)
    agent.call("boot_check")
    problems += agent.problems
    problems += check.strays(d)
    problems += check.agreement(d, agent.status())
    p, _steps = check.drive(d, sc.goal, ctx.rel)
    problems += p
    acct = account(ctx.base_url, tid)
    if kind != "crash" and spans:
        chunks = ctx.rel.chunks("2.0.0")
        total = sum(c["length"] for c in chunks)
        again = refetched(spans, acct["starts"], total)
        bound = max(c["length"] for c in chunks) + 2 * ctx.rel.manifest("2.0.0")["image"]["compression"].get(
            "piece_size", 0)  # the interrupted chunk and the read-ahead (applier.stream.read_ahead)
        if again > bound:
            problems.append(f"the resumed download fetched {again} bytes again (more than one chunk and the "
                            f"read-ahead, {bound})")
    if not ctx.keep:
        shutil.rmtree(d, ignore_errors=True)
    return Result(rid, sc.name, kind, problems, seconds=time.monotonic() - t0)


# -- the campaign ------------------------------------------------------------------------
def plan(baselines: list[Baseline], *, sample: int | None, seed: int, crashes: bool = True) -> list[tuple]:
    """(baseline index, spec) for every trial; ``sample``: a deterministic random subset."""
    trials = []
    for i, b in enumerate(baselines):
        trials.append((i, ("clean",)))
        for sc_name, nth in b.sites:
            for kind in trace.KINDS:
                trials.append((i, (kind, sc_name, nth)))
        if crashes:
            ops = pickle.loads(Path(b.ops_file).read_bytes())
            for k, model, _ in crash.crash_sets(ops):
                trials.append((i, ("crash", k, model)))
    if sample is not None and sample < len(trials):
        rng = random.Random(seed)
        clean = [t for t in trials if t[1][0] == "clean"]
        rest = [t for t in trials if t[1][0] != "clean"]
        trials = clean + sorted(rng.sample(rest, max(0, sample - len(clean))), key=lambda t: (t[0], str(t[1])))
    return trials


def _parse_only(ids: list[str]) -> tuple[set[tuple[str, str]], set[str]]:
    scen, full = set(), set()
    for x in ids:
        name = x.split(":", 1)[0]
        cmd, _, state = name.partition("@")
        scen.add((cmd, state))
        full.add(x)
    return scen, full


_worker_ctx: Ctx | None = None
_worker_baselines: list[Baseline] = []


def _init(ctx: Ctx, baselines: list[Baseline]) -> None:
    global _worker_ctx, _worker_baselines
    _worker_ctx, _worker_baselines = ctx, baselines


def _work(item: tuple) -> Result:
    i, spec = item
    try:
        return run_trial(_worker_ctx, _worker_baselines[i], spec)
    except Exception as e:  # noqa: BLE001 - a harness failure is reported, not fatal
        b = _worker_baselines[i]
        return Result(f"{b.scenario.name}:" + ":".join(map(str, spec)), b.scenario.name, spec[0],
                      [f"HARNESS ERROR {type(e).__name__}: {e}"])


def _base(item: tuple) -> Baseline:
    ctx, sc = item
    return baseline(ctx, sc)


def _norm(problem: str) -> str:
    """A problem without its numbers and names, to group alike violations."""
    p = re.sub(r"\d+(\.\d+)*", "N", problem)
    p = re.sub(r"[0-9a-f]{12,}", "H", p)
    return p[:160]


def campaign(*, sample: int | None = None, seed: int = 0, jobs: int = 2, only: list[str] | None = None,
             crashes: bool = True, keep: bool = False, out=print, latest: Path = LATEST) -> dict:
    t0 = time.monotonic()
    OUT.mkdir(parents=True, exist_ok=True)
    rel = build_releases()
    server = make_server(rel.repo)
    work = WORK / f"run-{os.getpid()}"  # runs may overlap (pytest while a full campaign runs)
    try:
        base_url = server.url
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        snaps = make_snapshots(rel, base_url, work / "snap")
        pre_slot = {}
        for state, snap in snaps.items():
            probe = work / "probe"
            shutil.copytree(snap, probe, symlinks=True)
            o, _ = check.power_cycle(probe)
            pre_slot[state] = o.slot if o else None
            shutil.rmtree(probe)
        ctx = Ctx(rel, base_url, work, snaps, pre_slot, keep=keep)
        scenarios = [Scenario(c, s) for c in COMMANDS for s in STATES if c in ONLY.get(s, (c,))]
        only_full: set[str] = set()
        if only:
            scen, only_full = _parse_only(only)
            scenarios = [s for s in scenarios if (s.command, s.state) in scen]
        mp = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(jobs, mp_context=mp) as pool:
            baselines = list(pool.map(_base, [(ctx, sc) for sc in scenarios]))
        trials = plan(baselines, sample=None if only else sample, seed=seed, crashes=crashes)
        if only:
            trials = [t for t in trials if f"{baselines[t[0]].scenario.name}:" + ":".join(map(str, t[1])) in only_full
                      or baselines[t[0]].scenario.name in only_full]
        t_setup = time.monotonic() - t0
        results: list[Result] = []
        with ProcessPoolExecutor(jobs, mp_context=mp, initializer=_init, initargs=(ctx, baselines)) as pool:
            for res in pool.map(_work, trials, chunksize=1):
                results.append(res)
                if len(results) % 50 == 0:
                    out(f"  ... {len(results)}/{len(trials)} trials, "
                        f"{sum(1 for r in results if r.problems)} with violations")
                    _write_latest(latest, baselines, results, len(trials), time.monotonic() - t0, partial=True)
        summary = _write_latest(latest, baselines, results, len(trials), time.monotonic() - t0, partial=False)
        out(summary["table"])
        out(f"setup {t_setup:.0f}s, {len(results)} trials in {time.monotonic() - t0:.0f}s with {jobs} jobs")
        out(summary["line"])
        out(f"violations and how to reproduce them: {latest}")
        return summary
    finally:
        server.__exit__(None, None, None)
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def _write_latest(path: Path, baselines: list[Baseline], results: list[Result], planned: int, seconds: float,
                  *, partial: bool) -> dict:
    rows: dict[str, Counter] = defaultdict(Counter)
    for r in results:
        row = rows[r.scenario]
        if r.miss:
            row["missed"] += 1
            continue
        row["crash" if r.kind == "crash" else "clean" if r.kind == "clean" else "faults"] += 1
        if r.problems:
            row["violating"] += 1
    head = f"{'scenario':34} {'sites':>5} {'faults':>6} {'crash':>6} {'missed':>6} {'violating':>9}"
    lines = [head, "-" * len(head)]
    for b in baselines:
        c = rows.get(b.scenario.name, Counter())
        lines.append(f"{b.scenario.name:34} {len(b.sites):5} {c['faults']:6} {c['crash']:6} {c['missed']:6} "
                     f"{c['violating']:9}")
    nfaults = sum(1 for r in results if not r.miss and r.kind != "clean")
    bad = [r for r in results if r.problems and not r.miss]
    line = f"{nfaults} faults, {len(bad)} violations"
    groups: dict[str, list[tuple[Result, str]]] = defaultdict(list)
    for r in bad:
        for p in r.problems:
            groups[_norm(p)].append((r, p))
    body = [f"abflip fault campaign ({'in progress, ' if partial else ''}{len(results)}/{planned} trials, "
            f"{seconds:.0f}s)", "", *lines, "", line, ""]
    body += [f"Kinds of violation ({len(groups)}), most frequent first:"]
    for key, items in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        r, p = items[0]
        body.append(f"  [{len(items)}x] {p}")
        body.append(f"      e.g. python3 -m tests.faults.campaign --keep --only '{r.id}'")
    body += ["", "Every violation:"]
    for r in bad:
        body.append(f"- {r.id}")
        body += [f"    {p}" for p in r.problems]
        body.append(f"    reproduce: python3 -m tests.faults.campaign --keep --only '{r.id}'")
    for b in baselines:
        for p in b.problems:
            body.append(f"- {b.scenario.name}:clean-run  {p}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(body) + "\n")
    os.replace(tmp, path)
    return {"faults": nfaults, "violations": len(bad), "line": line, "table": "\n".join(lines),
            "results": results, "kinds": {k: len(v) for k, v in groups.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m tests.faults.campaign", description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--full", action="store_true", help="every fault site, kind and crash state (default)")
    g.add_argument("--sample", type=int, help="a deterministic random sample of N trials (plus each clean run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--only", action="append", help="run only this trial id or scenario (command@state)")
    ap.add_argument("--no-crash", action="store_true", help="skip the power-cut crash states")
    ap.add_argument("--keep", action="store_true", help="keep trial directories (under WORK/t)")
    a = ap.parse_args(argv)
    if not shutil.which("strace"):
        print("error (user): strace is missing\n  hint: apt-get install -y strace", file=sys.stderr)
        return 2
    s = campaign(sample=a.sample, seed=a.seed, jobs=a.jobs, only=a.only, crashes=not a.no_crash, keep=a.keep)
    if a.keep and a.only:
        for r in s["results"]:
            print(f"{r.id}: kept in {WORK}/run-{os.getpid()}/t/{_tid(r.id)}")
            for p in r.problems:
                print(f"{r.id}: {p}")
    return 1 if s["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
