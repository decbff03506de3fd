"""``abflip run``: one pass of what the timer does. Idempotent.

check -> download (any time) -> apply (in a maintenance window) -> the reboot command (in a
window, with an update pending). Skipped while the booted slot is on trial or a requested
rollback waits for its reboot (the health unit and the reboot decide those). The network may be
down in the window: what is staged is applied all the same, and the transport error is the
result's ``error`` (or the command's, when nothing was applied).

A pending update whose version the check just saw withdrawn is cancelled, not booted
(:func:`applier.install.discard`): the device stays on what it runs.
"""

from __future__ import annotations

from metadata.errors import TransportError

from .install import apply, discard, download
from .lifecycle import Phase, phase_of
from .offer import Offer, check, why_not_offered
from .policy import StageDiscarded
from .session import Session
from .windows import in_window

__all__ = ["run"]


def run(session: Session, offer: Offer, *, allow_downgrade: bool = False, retry_failed: bool = False,
        reboot: bool = True) -> dict:
    with session.locked():
        out: dict = {"schema": 1, "check": None, "download": None, "apply": None, "rebooted": False}
        loaded = session.load()
        phase = phase_of(loaded.state)
        if phase in (Phase.TRIAL, Phase.ROLLBACK_REQUESTED):
            out["skipped"] = (f"state {loaded.state.state}: waiting for boot-check" if phase == Phase.TRIAL else
                              f"a rollback to slot {loaded.state.rollback.to_slot} waits for a reboot")
            out["next_window"] = session.window_info()
            return out
        failure: TransportError | None = None
        try:
            chk = check(session, offer, allow_downgrade=allow_downgrade, retry_failed=retry_failed)
            out["check"] = chk
            if chk["available"] and not chk["staged"]:
                out["download"] = session.guarded(lambda: download(
                    session, offer, allow_downgrade=allow_downgrade, retry_failed=retry_failed), "download").to_json()
        except TransportError as e:
            failure = e
        loaded = session.load()
        state, booted = loaded.state, loaded.booted
        t = state.target
        if (phase_of(state) == Phase.PENDING and t is not None and offer.last is not None and failure is None
                and (why := why_not_offered(offer.last, t, replaced=False)) is not None):
            session.guarded(lambda: discard(session, state, booted), "run")
            out["discarded"] = f"{why}: the pending {t.version} was cancelled, not booted"
            loaded = session.load()
            state = loaded.state
        open_now = in_window(session.config.windows, session.clock())
        if state.state == Phase.STAGED and open_now:
            try:
                out["apply"] = session.guarded(lambda: apply(session, offer), "apply").to_json()
            except StageDiscarded as e:  # no longer offered (withdrawn or replaced): not applied, and why
                out["discarded"] = e.message
            state = session.load().state
        if failure is not None and out["apply"] is None:
            raise failure
        out["error"] = failure.to_json() if failure else None
        if state.state == Phase.PENDING and open_now and reboot and session.reboot is not None:
            session.reboot()
            out["rebooted"] = True
        out["state"] = state.state
        out["next_window"] = session.window_info()
        return out
