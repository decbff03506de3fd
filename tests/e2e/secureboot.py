"""Secure Boot under QEMU with *our own* keys: OVMF's Secure Boot build, a variable store with our PK, KEK and db
enrolled, and EFI binaries signed by the db key (the release's Secure Boot key, docs/keys.md "Secure Boot").

* `make_keys(dir)`: self-signed RSA 2048 certificates for PK, KEK, db, and `other` (a key the firmware does not
  trust: what an attacker without the db key could sign with);
* `enrolled_vars(path, keys)`: a copy of OVMF's empty store with PK, KEK and db set and Secure Boot on
  (`virt-fw-vars`, PyPI virt-firmware, the test extra);
* `sign(src, dst, key, cert)`: `sbsign`;
* `CODE` and `QEMU_ARGS`: the firmware image and the machine options it needs (SMM, the flash's secure property).

What OVMF 2022.11 and systemd-boot 252 do with it is asserted by tests/e2e/test_secure_boot_facts.py.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

from . import vm

__all__ = ["CODE", "QEMU_ARGS", "Keys", "enrolled_vars", "make_keys", "missing_prerequisites", "sign", "OWNER"]

CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd")
QEMU_ARGS = ("-machine", "q35,smm=on", "-global", "driver=cfi.pflash01,property=secure,value=on")
OWNER = "5f3b0a1e-7d0c-4e1f-9a55-61626c697021"  # the signature owner GUID of our certificates ("abflip!")
STUB = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")


def _virt_fw_vars() -> str | None:
    beside = Path(sys.executable).parent / "virt-fw-vars"
    return str(beside) if beside.exists() else shutil.which("virt-fw-vars")


def missing_prerequisites() -> list[str]:
    missing = vm.missing_prerequisites()
    for tool, pkg in (("openssl", "apt: openssl"), ("sbsign", "apt: sbsigntool"), ("objcopy", "apt: binutils")):
        if shutil.which(tool) is None:
            missing.append(f"{tool} ({pkg})")
    if _virt_fw_vars() is None:
        missing.append("virt-fw-vars (pip: virt-firmware, the test extra)")
    for f, pkg in ((CODE, "ovmf"), (STUB, "systemd-boot-efi")):
        if not f.is_file():
            missing.append(f"{f} (apt: {pkg})")
    return missing


@dataclasses.dataclass(frozen=True)
class Keys:
    dir: Path

    def key(self, name: str) -> Path:
        return self.dir / f"{name}.key"

    def cert(self, name: str) -> Path:
        return self.dir / f"{name}.crt"


def make_keys(out: Path) -> Keys:
    out.mkdir(parents=True, exist_ok=True)
    for name in ("PK", "KEK", "db", "other"):
        if not (out / f"{name}.crt").exists():
            subprocess.run(["openssl", "req", "-quiet", "-new", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256",
                            "-days", "3650", "-subj", f"/CN=abflip test {name}/", "-keyout", str(out / f"{name}.key"),
                            "-out", str(out / f"{name}.crt")], check=True, capture_output=True)
    return Keys(out)


def enrolled_vars(path: Path, keys: Keys) -> Path:
    """OVMF's empty variable store with our PK, KEK and db, Secure Boot on (one per machine, it is written)."""
    tool = _virt_fw_vars()
    assert tool is not None
    subprocess.run([tool, "--input", str(vm.OVMF_VARS), "--output", str(path),
                    "--set-pk", OWNER, str(keys.cert("PK")), "--add-kek", OWNER, str(keys.cert("KEK")),
                    "--add-db", OWNER, str(keys.cert("db")), "--secure-boot"], check=True, capture_output=True)
    return path


def sign(src: Path, dst: Path, keys: Keys, name: str = "db") -> Path:
    subprocess.run(["sbsign", "--key", str(keys.key(name)), "--cert", str(keys.cert(name)), "--output", str(dst),
                    str(src)], check=True, capture_output=True)
    return dst
