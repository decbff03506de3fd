"""Device configuration (``/etc/abflip/abflip.toml``), validated on load.

Example::

    [repository]
    url = "https://updates.example.com/repo"   # serves metadata/ and targets/
    trusted_root = "/etc/abflip/root.json"     # bootstrap root, shipped in the image

    [device]
    product = "edge-os"
    channel = "stable"
    hardware_id = "acme-box-v2"

    [slots]
    a = { device = "/dev/disk/by-partlabel/root-a", partlabel = "root-a" }
    b = { device = "/dev/disk/by-partlabel/root-b", partlabel = "root-b" }

    [paths]                                    # all optional; tests point them at files
    esp = "/boot/efi"
    state_dir = "/var/lib/abflip"
    cmdline = "/proc/cmdline"
    efivars = "/sys/firmware/efi/efivars"

    [boot]
    tries = 3

Every error names the key and the file.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from metadata.errors import UserError
from metadata.manifest import HWID_RE, NAME_RE

__all__ = ["Config", "SlotConfig", "DEFAULT_PATH"]

DEFAULT_PATH = Path("/etc/abflip/abflip.toml")
SLOT_NAMES = ("a", "b")


@dataclass(frozen=True)
class SlotConfig:
    name: str
    device: Path
    partlabel: str


@dataclass(frozen=True)
class Config:
    path: Path
    repository_url: str
    trusted_root: Path
    product: str
    channel: str
    hardware_id: str
    slots: dict[str, SlotConfig]
    esp: Path = Path("/boot/efi")
    state_dir: Path = Path("/var/lib/abflip")
    cmdline: Path = Path("/proc/cmdline")
    efivars: Path = Path("/sys/firmware/efi/efivars")
    tries: int = 3
    http_timeout: float = 30.0
    retries: int = 5
    extra: dict = field(default_factory=dict)

    @property
    def metadata_url(self) -> str:
        return self.repository_url.rstrip("/") + "/metadata/"

    @property
    def targets_url(self) -> str:
        return self.repository_url.rstrip("/") + "/targets/"

    @classmethod
    def load(cls, path: Path = DEFAULT_PATH) -> Config:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"no configuration file at {path}", hint="create it (see README 'Device configuration') or pass --config") from None
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read configuration {path}: {e}") from None
        return cls.from_dict(raw, path)

    @classmethod
    def from_dict(cls, raw: dict, path: Path) -> Config:
        base = path.parent

        def bad(key: str, why: str) -> UserError:
            return UserError(f"{path}: {key} {why}")

        def table(name: str, required: bool = True) -> dict:
            t = raw.get(name)
            if t is None and not required:
                return {}
            if not isinstance(t, dict):
                raise bad(f"[{name}]", "is missing or not a table")
            return t

        def string(t: dict, section: str, key: str, default: str | None = None) -> str:
            v = t.get(key, default)
            if not isinstance(v, str) or not v:
                raise bad(f"{section}.{key}", "is missing or not a non-empty string")
            return v

        def pathval(t: dict, section: str, key: str, default: str | None = None) -> Path:
            p = Path(string(t, section, key, default))
            return p if p.is_absolute() else base / p

        repo = table("repository")
        url = string(repo, "repository", "url")
        if not url.startswith(("http://", "https://")):
            raise bad("repository.url", f"must be an http(s) URL, not {url!r}")
        dev = table("device")
        product = string(dev, "device", "product")
        channel = string(dev, "device", "channel", "stable")
        hwid = string(dev, "device", "hardware_id")
        for key, val, pat in (("product", product, NAME_RE), ("channel", channel, NAME_RE), ("hardware_id", hwid, HWID_RE)):
            if not pat.match(val):
                raise bad(f"device.{key}", f"{val!r} is malformed")
        slots_t = table("slots")
        slots = {}
        for name in SLOT_NAMES:
            s = slots_t.get(name)
            if not isinstance(s, dict):
                raise bad(f"slots.{name}", "is missing (both slots a and b must be configured)")
            slots[name] = SlotConfig(name, pathval(s, f"slots.{name}", "device"),
                                     string(s, f"slots.{name}", "partlabel", f"root-{name}"))
        unknown = set(slots_t) - set(SLOT_NAMES)
        if unknown:
            raise bad("[slots]", f"has unknown slot(s) {sorted(unknown)}; only a and b exist")
        paths = table("paths", required=False)
        boot = table("boot", required=False)
        tries = boot.get("tries", 3)
        if not isinstance(tries, int) or isinstance(tries, bool) or not 1 <= tries <= 32:
            raise bad("boot.tries", f"must be an integer from 1 to 32, not {tries!r}")
        net = table("network", required=False)
        timeout = net.get("timeout", 30.0)
        retries = net.get("retries", 5)
        if not isinstance(timeout, (int, float)) or not 0 < timeout <= 3600:
            raise bad("network.timeout", "must be seconds in (0, 3600]")
        if not isinstance(retries, int) or not 0 <= retries <= 100:
            raise bad("network.retries", "must be an integer from 0 to 100")
        return cls(
            path=path, repository_url=url, trusted_root=pathval(repo, "repository", "trusted_root"),
            product=product, channel=channel, hardware_id=hwid, slots=slots,
            esp=pathval(paths, "paths", "esp", "/boot/efi"),
            state_dir=pathval(paths, "paths", "state_dir", "/var/lib/abflip"),
            cmdline=pathval(paths, "paths", "cmdline", "/proc/cmdline"),
            efivars=pathval(paths, "paths", "efivars", "/sys/firmware/efi/efivars"),
            tries=tries, http_timeout=float(timeout), retries=retries,
        )
