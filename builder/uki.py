"""A unified kernel image (UKI) whose command line carries the verity root hash, and its Secure Boot signature.

``release create --build-uki`` joins the kernel, the initrd, a command line and an os-release into one PE binary
with systemd's EFI stub (``linuxx64.efi.stub``), as systemd 252 documents it before ``ukify`` existed: ``objcopy``
adds the sections ``.osrel``, ``.cmdline``, ``.linux`` and ``.initrd`` after the stub's own, each at the next 4 KiB
of the image's address space. The command line is the device-owned verity words (:func:`metadata.verity.kernel_args`,
without the slot: a UKI cannot know which slot it boots from, the initrd finds it) and the release's own options.
Under Secure Boot the stub ignores what the boot loader passes and uses this line: the firmware's signature check
of the UKI covers the root hash, and the root hash covers every block of the root (docs/keys.md, docs/threat-model.md).

Signing goes through :class:`EfiSigner`, one method: turn an unsigned PE file into a signed one. :class:`SbsignSigner`
is ``sbsign`` (sbsigntool) with a key file and its certificate; a KMS or HSM signer implements the same method
(sbsign's ``--engine pkcs11`` with a key URI, or a service that signs the Authenticode digest) and is passed in its
place. Tools: ``objcopy`` (binutils), ``sbsign`` (sbsigntool), the stub (systemd-boot-efi).
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .errors import BuildError

__all__ = ["EfiSigner", "SbsignSigner", "build_uki", "check_tools", "STUB", "osrel_text", "pe_sections"]

STUB = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")
ALIGN = 4096
TOOL_TIMEOUT = 600


class EfiSigner(Protocol):
    """Signs a PE file for Secure Boot: ``unsigned`` in, an Authenticode-signed copy at ``signed`` out."""

    def sign(self, unsigned: Path, signed: Path) -> None: ...


def _tool(argv: list[str], what: str, package: str) -> None:
    if shutil.which(argv[0]) is None:
        raise BuildError(f"{what} needs {argv[0]}, which is not installed", hint=f"apt-get install {package}")
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise BuildError(f"{what}: {argv[0]} did not finish within {TOOL_TIMEOUT} s") from None
    if p.returncode != 0:
        detail = (p.stderr or p.stdout).strip().splitlines()
        raise BuildError(f"{what}: {argv[0]} exited {p.returncode}: {detail[-1] if detail else 'no message'}")


@dataclass(frozen=True)
class SbsignSigner:
    """``sbsign --key KEY --cert CERT``: a PEM private key file and its X.509 certificate (the one enrolled in the
    devices' Secure Boot ``db``)."""

    key: Path
    cert: Path

    def check(self) -> None:
        """Refuse, before any work, what would fail at the end."""
        if shutil.which("sbsign") is None:
            raise BuildError("signing a UKI needs sbsign, which is not installed", hint="apt-get install sbsigntool")
        for what, p in (("--secure-boot-key", self.key), ("--secure-boot-cert", self.cert)):
            if not Path(p).is_file():
                raise BuildError(f"{what} {p} does not exist or is not a file",
                                 hint="pass the db key (PEM) and its certificate, docs/keys.md \"Secure Boot\"")

    def sign(self, unsigned: Path, signed: Path) -> None:
        _tool(["sbsign", "--key", str(self.key), "--cert", str(self.cert), "--output", str(signed), str(unsigned)],
              "signing the UKI", "sbsigntool")


def pe_sections(data: bytes) -> list[tuple[str, int, int]]:
    """``(name, virtual address, virtual size)`` of each section of a PE image; ValueError if it is not one."""
    if len(data) < 0x40 or data[:2] != b"MZ":
        raise ValueError("not a PE file (no MZ header)")
    pe = struct.unpack_from("<I", data, 0x3C)[0]
    if data[pe:pe + 4] != b"PE\0\0":
        raise ValueError("not a PE file (no PE signature)")
    count, opt_size = struct.unpack_from("<H", data, pe + 6)[0], struct.unpack_from("<H", data, pe + 20)[0]
    table = pe + 24 + opt_size
    out = []
    for i in range(count):
        off = table + 40 * i
        name = data[off:off + 8].rstrip(b"\0").decode("ascii", "replace")
        vsize, vaddr = struct.unpack_from("<II", data, off + 8)
        out.append((name, vaddr, vsize))
    return out


def osrel_text(product: str, version: str) -> str:
    """The UKI's ``.osrel``: what systemd-boot shows for it when it lists it by itself."""
    return f'NAME="{product}"\nID={product}\nVERSION_ID={version}\nIMAGE_VERSION={version}\nPRETTY_NAME="{product} {version}"\n'


def check_tools(stub: Path = STUB) -> None:
    """What :func:`build_uki` needs, checked before any work."""
    if not stub.is_file():
        raise BuildError(f"building a UKI needs systemd's EFI stub {stub}", hint="apt-get install systemd-boot-efi")
    if shutil.which("objcopy") is None:
        raise BuildError("building a UKI needs objcopy, which is not installed", hint="apt-get install binutils")


def build_uki(out: Path, *, kernel: Path, initrd: Path | None, cmdline: str, osrel: str, stub: Path = STUB,
              signer: EfiSigner | None = None) -> None:
    """Write the UKI to ``out`` (signed by ``signer`` when given). The scratch files go beside ``out``."""
    check_tools(stub)
    try:
        sections = pe_sections(stub.read_bytes())
    except ValueError as e:
        raise BuildError(f"{stub}: {e}") from None
    addr = max(va + size for _, va, size in sections)
    parts = [(".osrel", out.with_name(out.name + ".osrel")), (".cmdline", out.with_name(out.name + ".cmdline")),
             (".linux", kernel)] + ([(".initrd", initrd)] if initrd is not None else [])
    parts[0][1].write_text(osrel)
    parts[1][1].write_text(cmdline)
    argv = ["objcopy"]
    for name, path in parts:
        addr = -(-addr // ALIGN) * ALIGN
        argv += ["--add-section", f"{name}={path}", "--change-section-vma", f"{name}={addr:#x}"]
        addr += Path(path).stat().st_size
    unsigned = out.with_name(out.name + ".unsigned") if signer is not None else out
    try:
        _tool(argv + [str(stub), str(unsigned)], "building the UKI", "binutils")
        if signer is not None:
            signer.sign(unsigned, out)
    finally:
        for _, p in parts[:2]:
            p.unlink(missing_ok=True)
        if signer is not None:
            unsigned.unlink(missing_ok=True)
