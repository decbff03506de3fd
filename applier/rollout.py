"""Phased rollouts, decided on the device: is this device in, and why. Pure: no I/O, no clock.

A channel pointer may carry a signed ``rollout`` (``metadata.manifest.Rollout``): a percentage,
a pause flag and an optional seed. Each device draws a stable bucket in ``[0, 10000)`` from
``sha256("abflip-rollout/1" \\0 product \\0 seed \\0 device id)``, where the seed is the
rollout's ``seed`` or, without one, the release's version. The device is in when
``bucket < percent * 100``. So:

- deterministic: the same device, product and seed always draw the same bucket;
- monotonic: widening 1 % -> 10 % -> 50 % only adds devices, nobody flips out;
- per release by default (a new version draws new buckets: the first 1 % is not always the same
  devices); a fixed ``seed`` keeps the same cohort first across releases;
- a mirror cannot widen or narrow it: the parameters are inside the TUF-signed pointer.

``paused`` stops devices that have not started this release (nothing downloaded for it yet);
a device that has started finishes. A device without a readable id is in only at 100 %.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from metadata.manifest import Rollout

__all__ = ["BUCKETS", "DEVICE_ID_MAX", "Decision", "bucket", "decide", "device_id_problem"]

BUCKETS = 10000
DEVICE_ID_MAX = 128
# /etc/machine-id is 32 lowercase hex digits; other ids (a serial number, a UUID) are allowed too.
_DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}\Z")


def device_id_problem(value: object) -> str | None:
    """What is wrong with a device id (the stripped content of ``device.id_file``), or None."""
    if not isinstance(value, str) or not _DEVICE_ID.match(value):
        shown = repr(value[:40]) + ("…" if isinstance(value, str) and len(value) > 40 else "") \
            if isinstance(value, str) else type(value).__name__
        return (f"device id {shown} is malformed (1 to {DEVICE_ID_MAX} letters, digits, '.', '_', ':' or '-', "
                "like /etc/machine-id's 32 hex digits)")
    if set(value) == {"0"}:
        return "device id is all zeros (an uninitialised machine-id)"
    return None


def bucket(device_id: str, product: str, seed: str) -> int:
    """The device's stable bucket in ``[0, BUCKETS)`` for this product and seed."""
    import hashlib  # here: status and boot-check import this module, only check buckets (issue 14)

    h = hashlib.sha256(b"\0".join([b"abflip-rollout/1", product.encode(), seed.encode(), device_id.encode()]))
    return int.from_bytes(h.digest()[:8], "big") % BUCKETS


@dataclass(frozen=True)
class Decision:
    """Whether this device takes the release now, and the sentence that says why."""

    member: bool  # in the rollout's percentage (regardless of a pause)
    allowed: bool  # may start (or continue) this release now
    reason: str
    percent: int
    paused: bool
    bucket: int | None  # None: no rollout, or no device id
    seed: str | None

    def to_json(self) -> dict:
        return {"in": self.allowed, "member": self.member, "reason": self.reason, "percent": self.percent,
                "paused": self.paused, "bucket": self.bucket, "seed": self.seed}


def decide(rollout: Rollout | None, *, product: str, version: str, device_id: str | None,
           device_id_error: str | None = None, started: bool = False) -> Decision:
    """Is this device in the rollout of ``product`` ``version``? ``started``: it already
    downloaded (part of) this very release, so a pause does not stop it."""
    if rollout is None:
        return Decision(True, True, "the channel offers this release to every device", 100, False, None, None)
    seed = rollout.seed if rollout.seed is not None else version
    pct = rollout.percent
    if device_id is None:
        member = pct >= 100
        why = (f"this device has no usable id ({device_id_error or 'none'}), so it is only in at 100 %; "
               f"the rollout is at {pct} %")
        b = None
    else:
        b = bucket(device_id, product, seed)
        member = b < pct * (BUCKETS // 100)
        why = (f"bucket {b / 100:.2f} of 100 is {'below' if member else 'not below'} the rollout's {pct} %")
    if not member:
        return Decision(False, False, f"not in the rollout yet: {why}", pct, rollout.paused, b, seed)
    if rollout.paused and not started:
        return Decision(True, False, f"the rollout is paused at {pct} % and this device has not started it ({why})",
                        pct, True, b, seed)
    if rollout.paused:
        return Decision(True, True, f"the rollout is paused at {pct} %, but this device had already started it",
                        pct, True, b, seed)
    return Decision(True, True, f"in the rollout: {why}", pct, False, b, seed)
