"""The invariants checked after every fault or crash state, and the drive to completion.

Each check returns problems as short strings; an empty list means the invariant holds.
The device is read with the simulator's own parser (:mod:`abflip.sim`), not the agent's.
"""

from __future__ import annotations

import hashlib
import json
import traceback
from pathlib import Path

from .world import Releases

STRAY_PATTERNS = (".state-*", ".abflip-tmp-*")
MAX_STEPS = 8


def sha256_prefix(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(size))
    return h.hexdigest()


def power_cycle(root: Path):
    """One boot of the loader model. Returns (outcome or None, problems)."""
    from abflip.sim import SimDevice

    try:
        return SimDevice(root).boot(), []
    except RuntimeError as e:
        return None, [f"power cycle: {e}"]
    except (OSError, ValueError) as e:
        return None, [f"power cycle: the loader model cannot read the ESP: {e!r}"]


def booted_image(root: Path, outcome, rel: Releases) -> tuple[str | None, list[str]]:
    """The version whose verified image the selected slot holds, and problems."""
    if outcome is None:
        return None, []
    problems = []
    if outcome.slot not in ("a", "b"):
        return None, [f"boot: entry {outcome.entry} names no slot (options {outcome.options!r})"]
    version = None
    slot_file = root / f"slot-{outcome.slot}.img"
    for v, (size, sha) in rel.known_images().items():
        if sha256_prefix(slot_file, size) == sha:
            version = v
            break
    if version is None:
        problems.append(f"boot: entry {outcome.entry} boots slot {outcome.slot}, which holds no verified image")
    # its kernel and initrd must be there and be a release's
    text = (root / "esp" / "loader" / "entries" / outcome.entry).read_text(errors="replace")
    known = rel.known_boot_files()
    for line in text.splitlines():
        k, _, v = line.strip().partition(" ")
        if k in ("linux", "initrd", "efi"):
            f = root / "esp" / v.strip().lstrip("/")
            try:
                ok = hashlib.sha256(f.read_bytes()).hexdigest() in known
            except OSError:
                ok = False
            if not ok:
                problems.append(f"boot: entry {outcome.entry}'s {k} {v.strip()} is missing or not a release's file")
    return version, problems


def persisted(root: Path) -> list[str]:
    """Every file the agent keeps parses."""
    from applier.state import State

    problems = []
    sp = root / "state" / "state.json"
    if sp.exists():
        try:
            State.from_json(json.loads(sp.read_text()))
        except Exception as e:  # noqa: BLE001 - any failure to read is the finding
            problems.append(f"state.json does not parse: {type(e).__name__}: {e}")
    edir = root / "esp" / "loader" / "entries"
    for f in sorted(edir.iterdir()) if edir.is_dir() else []:
        if f.name.startswith(".") or not f.name.endswith(".conf"):
            continue
        text = f.read_text(errors="replace")
        keys = {ln.split(" ", 1)[0] for ln in text.splitlines() if ln.strip()}
        if not ({"linux", "efi"} & keys) or "options" not in keys:
            problems.append(f"entry {f.name} is torn ({len(text)} bytes, keys {sorted(keys)})")
    rj = root / "state" / "staged" / "release.json"
    if rj.exists():
        try:
            json.loads(rj.read_bytes())
        except ValueError:
            problems.append("staged/release.json does not parse")
    return problems


def strays(root: Path) -> list[str]:
    found = []
    for pat in STRAY_PATTERNS:
        found += [str(p.relative_to(root)) for p in root.rglob(pat)]
    tuf = root / "state" / "tuf"
    if tuf.is_dir():
        found += [str(p.relative_to(root)) for p in tuf.glob("tmp*")]
    return [f"stray temp file {p}" for p in sorted(found)]


def entries(root: Path):
    from abflip.sim import parse_loader_entry

    edir = root / "esp" / "loader" / "entries"
    out = []
    for f in sorted(edir.iterdir()) if edir.is_dir() else []:
        if f.name.endswith(".conf") and not f.name.startswith("."):
            e = parse_loader_entry(f.name, f.read_text(errors="replace"))
            slot = next((a.split("=", 1)[1] for a in e.options.split() if a.startswith("abflip.slot=")), None)
            out.append((e, slot))
    return out


def agreement(root: Path, status: dict) -> list[str]:
    """A counting entry with tries left is always a known trial."""
    problems = []
    t = status.get("target") or {}
    for e, slot in entries(root):
        if e.tries_left is None or e.tries_left == 0:
            continue
        if status.get("state") not in ("pending", "trial") or t.get("slot") != slot or \
                (e.version and t.get("version") != e.version):
            problems.append(f"entry {e.file} counts tries but the state is {status.get('state')} "
                            f"(target {t.get('version')} in slot {t.get('slot')})")
    return problems


def signature(root: Path) -> dict:
    """What a command's effect is judged by (read straight from the files)."""
    try:
        s = json.loads((root / "state" / "state.json").read_text())
    except (OSError, ValueError):
        s = {}
    return {"state": s.get("state"), "rollback": bool(s.get("rollback")),
            "target": (s.get("target") or {}).get("version"), "failed": sorted(s.get("failed_versions") or []),
            "floor": s.get("floor"), "entries": sorted(e.file for e, _ in entries(root))}


class Agent:
    """The device agent in process (each call a fresh Device, as each CLI call would be)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.problems: list[str] = []
        self.errors: list[str] = []

    def call(self, verb: str, **kw):
        from metadata.errors import Error

        from .world import device

        try:
            d = device(self.root)
            return getattr(d, verb)(**kw)
        except Error as e:
            self.errors.append(f"{verb}: error ({e.blame}): {e.message}")
            return None
        except Exception as e:  # noqa: BLE001 - a traceback is the finding
            tb = traceback.format_exception_only(type(e), e)[-1].strip()
            self.problems.append(f"{verb}: Traceback ({tb})")
            return None

    def status(self) -> dict:
        return self.call("status") or {}


def reached(goal: str, status: dict, root: Path) -> bool:
    live = [(e, s) for e, s in entries(root) if e.tries_left is None or e.tries_left > 0]
    if goal == "update":
        return (status.get("state") == "committed" and status.get("booted_slot") == "b"
                and status.get("booted_version") == "2.0.0" and not any(e.tries_left for e, _ in live))
    return (status.get("booted_slot") == "a" and status.get("booted_version") == "1.0.0"
            and status.get("state") not in ("pending", "trial") and not status.get("rollback")
            and not any(s == "b" and e.tries_left for e, s in live))


def drive(root: Path, goal: str, rel: Releases) -> tuple[list[str], int]:
    """Boot-check, then run/rollback and power-cycle until ``goal`` holds (bounded).
    Returns problems and the number of steps taken."""
    agent = Agent(root)
    problems: list[str] = []
    for step in range(MAX_STEPS):
        st = agent.status()
        if reached(goal, st, root):
            out, p = power_cycle(root)
            problems += p
            agent.call("boot_check")
            st2 = agent.status()
            if not reached(goal, st2, root):
                problems.append(f"goal {goal} held, but not after one more boot (booted {out and out.entry})")
            return problems + agent.problems, step
        if goal == "update":
            agent.call("run", reboot=False)
        elif not st.get("rollback"):
            agent.call("rollback")
        out, p = power_cycle(root)
        problems += p
        if out is None:
            return problems + agent.problems, step
        _, p = booted_image(root, out, rel)
        problems += p
        agent.call("boot_check")
    st = agent.status()
    errs = "; ".join(agent.errors[-2:])
    problems.append(f"goal {goal} not reached in {MAX_STEPS} steps: state {st.get('state')}, booted "
                    f"{st.get('booted_slot')} {st.get('booted_version')}, failed {st.get('failed_versions')}"
                    + (f" (last errors: {errs})" if errs else ""))
    return problems + agent.problems, MAX_STEPS
