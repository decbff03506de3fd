"""The lifecycle model checker: from the first state, apply every event breadth-first to a
bounded depth and check the invariants at every state reached.

A *world* is the device's files (a snapshot of the simulated device) and the repository's
:class:`~tests.model.world.RepoState`. An *event* is one of:

- a verb, run as the CLI would (a fresh ``Device`` each time): download, apply, install (also
  with --retry-failed and --allow-downgrade), run (its reboot is a boot), boot-check (the health
  unit; its reboot too), mark-good, rollback, provision (and --force), reset-state, check;
- a boot: the loader model picks an entry and counts it down (a boot that never reaches
  boot-check — a hang, a panic — is a boot followed by another boot);
- a power cut during a verb: the verb is run again from the same world and dies at its k-th
  file-changing system call (every k the verb makes), then the device boots;
- a repository change: a new release, a withdrawal (pointer back or in place), a rollout
  narrowed to nobody, paused, or back to everybody.

Release 3.0.0 fails its health check on the device. The invariants (``check_*`` below) are the
issue's: the device boots a verified slot with its boot files, and so does its fallback; no
counting entry without a pending or trial phase; committed means the booted slot is the
committed one; the floor never falls but by ``provision --force``; a failed version is not
retried unless asked; a withdrawn release is never started, nor committed once the device saw
it withdrawn; ``reset-state`` never loses a valid state; an error changes nothing or says what
it changed; no traceback, no internal error.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from abflip.sim import SimDevice, parse_loader_entry, select_entry
from metadata.errors import Error, InternalError

from .world import (BAD, CLOCK, VERSIONS, Digest, MemoryClient, MemoryFetcher, Releases, RepoState, Snapshot, digest,
                    initial_device, restore, snapshot)


class PowerCut(BaseException):
    """The machine lost power (raised at a file-changing system call; nothing after it is written)."""


# -- power cuts: an audit hook counts file-changing calls and cuts at the k-th ----------------------
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class _Cutter:
    def __init__(self) -> None:
        self.armed = False
        self.count = 0
        self.cut_at = 0  # 0: count only
        self.dead = False
        self.root = ""

    def __call__(self, event: str, args: tuple) -> None:
        if not self.armed:
            return
        if event == "open":
            path, mode, flags = (args + (None, None, 0))[:3]
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & _WRITE_FLAGS)
            if not writes or not isinstance(path, (str, bytes, os.PathLike)):
                return
        elif event not in ("os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.truncate",
                           "os.link", "os.symlink", "os.chmod"):
            return
        if self.dead:
            raise PowerCut(event)
        self.count += 1
        if self.cut_at and self.count >= self.cut_at:
            self.dead = True
            raise PowerCut(event)


CUTTER = _Cutter()
sys.addaudithook(CUTTER)


@contextlib.contextmanager
def cutting(cut_at: int):
    CUTTER.count, CUTTER.cut_at, CUTTER.dead, CUTTER.armed = 0, cut_at, False, True
    try:
        yield CUTTER
    finally:
        CUTTER.armed = False


# -- the world ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class World:
    device: Snapshot
    repo: RepoState


@dataclass
class Outcome:
    error: Error | None = None
    problem: str | None = None  # a traceback or an internal error: always a violation
    result: object = None
    cut: bool = False
    writes: int = 0


@dataclass
class Checker:
    releases: Releases
    workdir: Path
    depth: int = 6
    cuts: bool = True
    cut_depth: int = 2  # power cuts inside the verbs run from the states of the first levels
    recovery: int = 2  # events explored after a power cut
    max_cuts: int = 0  # 0: every write of a verb; N: the first N and the last one
    states: int = 0
    transitions: int = 0
    by_event: collections.Counter = field(default_factory=collections.Counter)
    violations: list[str] = field(default_factory=list)
    seen: dict[str, int] = field(default_factory=dict)  # world key -> depth first reached
    _digests: dict[Snapshot, Digest] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = self.workdir / "dev"
        self.on_disk: Snapshot | None = None  # what self.root holds (None: unknown)
        self._config = None

    def put(self, snap: Snapshot) -> None:
        """The device directory holds ``snap`` (only the differences are written)."""
        if self.on_disk is not snap:
            restore(self.root, snap, self.on_disk)
            self.on_disk = snap

    def take(self) -> Snapshot:
        self.on_disk = snapshot(self.root)
        return self.on_disk

    # -- running one event on a world --------------------------------------------------------
    def device(self, repo: RepoState, reboots: list):
        from applier.agent import Device
        from applier.config import Config

        if self._config is None:
            self._config = Config.load(self.root / "abflip.toml")  # the same file in every world
        return Device(self._config, clock=lambda: CLOCK, reboot=lambda: reboots.append(1),
                      client_factory=lambda: MemoryClient(self.releases, repo),
                      fetcher=MemoryFetcher(self.releases))  # type: ignore[arg-type]

    def boot(self) -> None:
        SimDevice(self.root).boot()

    def verb(self, name: str, repo: RepoState, *, cut_at: int = 0) -> Outcome:
        reboots: list = []
        out = Outcome()
        with cutting(cut_at) as c:
            try:
                dev = self.device(repo, reboots)
                fn = VERBS[name]
                out.result = fn(dev, self.releases)
            except PowerCut:
                out.cut = True
            except InternalError as e:
                out.problem = f"internal error: {e.message}"
            except Error as e:
                out.error = e
            except Exception as e:  # noqa: BLE001 - a traceback is the finding
                out.problem = "traceback: " + "".join(traceback.format_exception_only(type(e), e)).strip()
            out.writes = c.count
        if out.cut or reboots:
            try:
                self.boot()
            except RuntimeError as e:
                out.problem = out.problem or f"after {name}: the device does not boot ({e})"
        return out

    # -- the search --------------------------------------------------------------------------
    def events(self, world: World) -> list[tuple[str, Callable[[], tuple[World, Outcome]]]]:
        out = []
        for name in VERBS:
            out.append((name, lambda n=name: self._run_verb(world, n)))
        out.append(("boot", lambda: self._run_boot(world)))
        for name, repo in repo_events(world.repo):
            out.append((f"repo:{name}", lambda r=repo: (World(world.device, r), Outcome())))
        return out

    def _run_verb(self, world: World, name: str, cut_at: int = 0) -> tuple[World, Outcome]:
        self.put(world.device)
        self.on_disk = None  # the verb changes it
        out = self.verb(name, world.repo, cut_at=cut_at)
        return World(self.take(), world.repo), out

    def _run_boot(self, world: World) -> tuple[World, Outcome]:
        self.put(world.device)
        self.on_disk = None
        out = Outcome()
        try:
            self.boot()
        except RuntimeError as e:
            out.problem = f"the device does not boot ({e})"
        return World(self.take(), world.repo), out

    def key(self, world: World) -> str:
        return f"{self.digest(world.device).key}|{world.repo}"

    def digest(self, snap: Snapshot) -> Digest:
        d = self._digests.get(snap)
        if d is None:
            d = self._digests[snap] = digest(snap, self.releases)
        return d

    def run(self, *, progress: Callable[[str], None] | None = None) -> None:
        """Breadth-first: every event from every state to ``depth``; power cuts inside every verb
        from the states of the first ``cut_depth`` levels, each cut state then explored
        ``recovery`` events further (what the next commands make of it)."""
        self.root.parent.mkdir(parents=True, exist_ok=True)
        first = World(initial_device(self.root, self.releases), RepoState())
        out = self.verb("provision", first.repo)
        assert out.error is None and out.problem is None, (out.error, out.problem)
        first = World(self.take(), first.repo)
        frontier = [(first, ("provision",), self.depth, False)]
        self.seen[self.key(first)] = self.depth
        self.states = 1
        t0 = time.monotonic()
        level = 0
        while frontier:
            level += 1
            nxt = []
            for world, path, budget, after_cut in frontier:
                self._digests.clear()
                for name, go in self.events(world):
                    cases = [(name, go, budget - 1, after_cut)]
                    if self.cuts and not after_cut and level <= self.cut_depth and name in CUT_VERBS:
                        cases += [(label, fn, min(budget - 1, self.recovery), True) for label, fn in
                                  self._cut_cases(world, name)]
                    for label, fn, left, cut_born in cases:
                        after, out = fn()
                        self.transitions += 1
                        self.by_event["cut" if label.startswith("cut") else label] += 1
                        trail = path + (label,)
                        self.check(world, after, label, out, trail)
                        k = self.key(after)
                        if k not in self.seen:
                            self.states += 1
                        if self.seen.get(k, -1) < left:
                            self.seen[k] = left
                            if left > 0:
                                nxt.append((after, trail, left, cut_born))
            frontier = nxt
            if progress:
                progress(f"level {level}: {self.states} states, {self.transitions} transitions, "
                         f"{len(self.violations)} violations, {time.monotonic() - t0:.0f} s")

    def _cut_cases(self, world: World, name: str):
        self.put(world.device)
        self.on_disk = None
        n = self.verb(name, world.repo).writes  # how many file-changing calls the verb makes from here
        ks = range(1, n + 1)
        if self.max_cuts and n > self.max_cuts:
            ks = [*range(1, self.max_cuts), n]
        return [(f"cut:{name}:{k}", lambda k=k: self._run_verb(world, name, cut_at=k)) for k in ks]

    # -- the invariants ------------------------------------------------------------------------
    def check(self, before: World, after: World, label: str, out: Outcome, trail: tuple[str, ...]) -> None:
        problems = []
        if out.problem:
            problems.append(out.problem)
        a, b = self.digest(after.device), self.digest(before.device)
        st = self.status(after)
        if isinstance(st, str):
            problems.append(st)
        else:
            problems += self.check_boot(a)
            problems += self.check_agreement(a, st)
            problems += self.check_committed(st)
            problems += self.check_phase(a, st)
            problems += self.check_history(b, a, before, label, out, st)
        if out.error is not None:
            if a.material != b.material:
                problems += self.check_error(self.settled(before), a, label, out.error)
        for p in problems:
            self.violations.append(f"{p}\n    after: {' -> '.join(trail)}  [repo {after.repo.label()}]")

    def settled(self, world: World) -> Digest:
        """``world`` as any command first makes it: what killed runs left swept, the state file
        reconciled with the boot loader and saved (what the loader did is recorded, not changed,
        by the command)."""
        self.put(world.device)
        self.on_disk = None
        s = self.device(world.repo, []).session()
        try:
            with s.locked():
                if (s.config.state_dir / "state.json").exists():
                    s.save(s.load().state)
        except Error:
            pass
        return self.digest(self.take())

    def status(self, world: World) -> dict | str:
        self.put(world.device)
        try:
            return self.device(world.repo, []).status()
        except Exception as e:  # noqa: BLE001
            return f"status fails: {type(e).__name__}: {e}"

    def check_boot(self, d: Digest) -> list[str]:
        """The entry the loader picks next, and its fallback, boot a slot holding the image of
        the entry's version, with that version's boot files."""
        entries = []
        for name in d.entries:
            text = d.files.get(f"esp/loader/entries/{name}", b"").decode(errors="replace")
            entries.append(parse_loader_entry(name, text))
        problems = []
        first = select_entry(entries)
        if first is None:
            return ["no entry: the device does not boot"]
        chosen = [first]
        if first.tries_left is not None and first.tries_left > 0:  # if this try fails, the loader picks the fallback
            rest = [replace(e, tries_left=0) if e is first else e for e in entries]
            fb = select_entry(rest)
            if fb is not None and fb is not first and fb.file != first.file:
                chosen.append(fb)
            else:
                problems.append(f"{first.file} counts tries but has no fallback")
        for e in chosen:
            slot = next((a.split("=", 1)[1] for a in e.options.split() if a.startswith("abflip.slot=")), None)
            holds = d.slots.get(slot) if slot else None
            version = e.file.removeprefix("abflip-").split("-")[0]
            if holds is None:
                problems.append(f"{e.file} boots slot {slot}, which holds no verified image")
            elif holds.replace("_", "+") != version:
                problems.append(f"{e.file} boots slot {slot}, which holds {holds}, not {version}")
            text = d.files.get(f"esp/loader/entries/{e.file}", b"").decode(errors="replace")
            for line in text.splitlines():
                k, _, v = line.partition(" ")
                if k in ("linux", "initrd"):
                    data = d.files.get("esp/" + v.strip().lstrip("/"))
                    import hashlib

                    if data is None or hashlib.sha256(data).hexdigest() not in self.releases.boot_files():
                        problems.append(f"{e.file}'s {k} {v.strip()} is missing or not a release's")
        return problems

    def check_agreement(self, d: Digest, st: dict) -> list[str]:
        t = st.get("target") or {}
        out = []
        for name in d.entries:
            e = parse_loader_entry(name, d.files.get(f"esp/loader/entries/{name}", b"").decode(errors="replace"))
            if e.tries_left is None or e.tries_left == 0:
                continue
            slot = next((a.split("=", 1)[1] for a in e.options.split() if a.startswith("abflip.slot=")), None)
            if st.get("phase") not in ("pending", "trial") or t.get("slot") != slot:
                out.append(f"{name} counts tries but the phase is {st.get('phase')} (target {t.get('version')} in "
                           f"slot {t.get('slot')})")
        return out

    def check_committed(self, st: dict) -> list[str]:
        if st.get("phase") != "committed":
            return []
        t, slot = st.get("target") or {}, st.get("booted_slot")
        s = (st.get("slots") or {}).get(slot) or {}
        if t.get("slot") != slot or s.get("status") != "good" or s.get("version") != t.get("version") \
                or st.get("booted_version") != t.get("version"):
            return [f"committed, but the booted slot {slot} ({st.get('booted_version')}, {s.get('status')}) is not the "
                    f"committed target {t.get('version')} in slot {t.get('slot')}"]
        return []

    def check_phase(self, d: Digest, st: dict) -> list[str]:
        phase, t = st.get("phase"), st.get("target") or {}
        names = [(n, parse_loader_entry(n, "")) for n in d.entries]
        of_target = [n for n, _ in names if f"-{t.get('slot')}" in n.rsplit("+", 1)[0][-2:]] if t else []
        out = []
        if phase in ("downloading", "staged") and of_target:
            out.append(f"phase {phase}, yet {of_target} names the slot being written")
        if phase == "staged" and d.slots.get(t.get("slot")) != t.get("version"):
            out.append(f"staged {t.get('version')}, but slot {t.get('slot')} holds {d.slots.get(t.get('slot'))}")
        if phase == "pending" and not any("+" in n and not n.endswith("+0.conf") and "+0-" not in n for n in of_target):
            out.append(f"pending {t.get('version')} without a counting entry for slot {t.get('slot')}")
        if phase == "rollback-requested":
            rb = st.get("rollback") or {}
            if not any(f"-{rb.get('from_slot')}+0-" in n for n in d.entries):
                out.append(f"a rollback is requested, but no entry of slot {rb.get('from_slot')} is marked bad")
        return out

    def check_history(self, b: Digest, a: Digest, before: World, label: str, out: Outcome, st: dict) -> list[str]:
        from metadata.version import Version

        problems = []
        sb, sa = b.state or {}, a.state or {}
        fb, fa = sb.get("floor"), sa.get("floor")
        verb = label.split(":")[1] if label.startswith("cut:") else label
        if fb and (not fa or Version.parse(fa) < Version.parse(fb)) and verb != "provision-force":
            problems.append(f"the floor fell from {fb} to {fa} ({label})")
        tb, ta = sb.get("target") or {}, sa.get("target") or {}
        started = ta.get("version") and sa.get("state") in ("downloading", "staged") and (
            ta.get("version") != tb.get("version") or sb.get("state") not in ("downloading", "staged", "pending"))
        if started:
            v = ta["version"]
            if v in (sb.get("failed_versions") or []) and verb != "install-retry":
                problems.append(f"{v} failed before and was started again by {label}")
            if v in before.repo.withdrawn:
                problems.append(f"{v} is withdrawn and was started by {label}")
        v = ta.get("version")
        if st.get("phase") == "committed" and sb.get("state") in ("pending", "trial") and tb.get("version") == v:
            rec = b.files.get("state/release-control.json")
            seen = json.loads(rec).get("withdrawn", []) if rec else []
            if v in seen:
                problems.append(f"{v} was committed although the device had seen it withdrawn ({label})")
            if v == BAD:
                problems.append(f"{BAD} (its health check fails) was committed by {label}")
        if fa == BAD and fb != BAD:
            problems.append(f"the floor rose to {BAD}, whose health check fails ({label})")
        bad_blessed = [n for n in a.entries if n.startswith(f"abflip-{BAD}-") and "+" not in n]
        if bad_blessed and not any(n.startswith(f"abflip-{BAD}-") and "+" not in n for n in b.entries):
            problems.append(f"{bad_blessed[0]} was blessed, though {BAD}'s health check fails ({label})")
        if verb == "reset-state" and b.state is not None and not out.cut:
            if out.error is None or a.material != b.material:
                problems.append("reset-state changed a valid state file")
        return problems

    def check_error(self, b: Digest, a: Digest, label: str, e: Error) -> list[str]:
        """An error exit means nothing changed, or its message says what did."""
        if a.material == b.material:
            return []
        says = ("discarded", "marked bad", "is blessed", "cancelled", "was modified", "is written", "stays",
                "downloading", "on trial", "run `abflip download`")
        if any(s in e.message or s in (e.hint or "") for s in says):
            return []
        changed = sorted(set(dict(a.files)) ^ set(dict(b.files)) | {k for k in a.files if a.files.get(k) !=
                                                                     b.files.get(k)})
        return [f"{label} failed ({e.blame}: {e.message}) and changed {changed[:6]} without saying so"]


READ_ONLY = ("check", "status")
#: The verbs a power cut is tried inside (install's --retry-failed/--allow-downgrade write as install does).
CUT_VERBS = ("download", "apply", "install", "run", "boot-check", "units", "mark-good", "rollback", "provision",
             "provision-force", "reset-state")


def _flashed(dev, rel: Releases) -> str:
    """The release whose image the booted slot holds (what an operator would provision)."""
    import hashlib

    slot = dev.boot.booted_slot()
    data = Path(dev.config.slots[slot].device).read_bytes()
    for v, (size, sha) in rel.images().items():
        if hashlib.sha256(data[:size]).hexdigest() == sha:
            return v
    return "1.0.0"


def _install(**kw):
    return lambda dev, rel: dev.install(**kw).to_json()


#: The verbs, as the CLI calls them.
VERBS: dict[str, Callable] = {
    "download": lambda dev, rel: dev.download().to_json(),
    "apply": lambda dev, rel: dev.apply(now=True).to_json(),
    "install": _install(),
    "install-retry": _install(retry_failed=True),
    "install-downgrade": _install(allow_downgrade=True),
    "run": lambda dev, rel: dev.run(),
    "boot-check": lambda dev, rel: dev.boot_check(),
    # the reference device's units: abflip-health (judge) before boot-complete.target, abflip-bless after it
    # (systemd starts the second only when the first succeeded)
    "units": lambda dev, rel: (dev.boot_check(bless=False), dev.mark_good(health=False))[1],
    "mark-good": lambda dev, rel: dev.mark_good(),
    "rollback": lambda dev, rel: dev.rollback(),
    "provision": lambda dev, rel: dev.provision(rel.dir(_flashed(dev, rel))),
    "provision-force": lambda dev, rel: dev.provision(rel.dir(_flashed(dev, rel)), force=True),
    "reset-state": lambda dev, rel: dev.reset_state(),
    "check": lambda dev, rel: dev.check(),
}


def repo_events(repo: RepoState) -> list[tuple[str, RepoState]]:
    """What the release engineer can do next (each a new channel pointer)."""
    out = []
    i = VERSIONS.index(repo.version)
    if i + 1 < len(VERSIONS):
        out.append(("publish", replace(repo, version=VERSIONS[i + 1])))
    if repo.version != "1.0.0" and repo.version not in repo.withdrawn:
        back = next(v for v in reversed(VERSIONS[:i]) if v not in repo.withdrawn)
        out.append(("withdraw", replace(repo, version=back, withdrawn=repo.withdrawn | {repo.version})))
        out.append(("withdraw-in-place", replace(repo, withdrawn=repo.withdrawn | {repo.version})))
    for name, r in (("narrow", (0, False)), ("pause", (100, True)), ("widen", None)):
        if repo.rollout != r:
            out.append((name, replace(repo, rollout=r)))
    return out


def explore(releases: Releases, *, depth: int, cuts: bool = True, cut_depth: int = 2, recovery: int = 2,
            max_cuts: int = 0, progress: Callable[[str], None] | None = None) -> Checker:
    real_sync = os.sync
    os.sync = lambda: None  # durability is the fault campaign's; here every write lands
    work = Path(tempfile.mkdtemp(prefix="abflip-model-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    try:
        c = Checker(releases, work, depth=depth, cuts=cuts, cut_depth=cut_depth, recovery=recovery,
                    max_cuts=max_cuts)
        c.run(progress=progress)
        return c
    finally:
        os.sync = real_sync
        shutil.rmtree(work, ignore_errors=True)
