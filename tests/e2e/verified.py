"""The reference device's verified-boot variants (issue 22): the images of `device.build_images`, released again.

`build_verified(cache, images)` adds one cached layer, `verified-<key>/`, keyed by the images layer and this
file: no tree is built again, the variants are other releases of the same erofs images.

* `v1-verity`, `v2-verity`: `release create --verity` with the image's kernel and initrd;
* Secure Boot (`secureboot/`): our own PK, KEK, db and a foreign key (tests/e2e/secureboot.py), an OVMF variable
  store with them enrolled, systemd-boot signed by db; `v1-sb`, `v2-sb`: `release create --verity --build-uki`
  signed by db, `v3-sb-foreign`: the same, signed by the foreign key (what someone without the db key can make).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from . import device as d
from . import secureboot as sb
from . import vm

__all__ = ["Verified", "build_verified", "VERITY", "SECURE_BOOT"]

#: name -> (the images' variant it releases again, how it is signed: None, "db" or "other")
VERITY = {"v1-verity": ("v1", None), "v2-verity": ("v2", None)}
SECURE_BOOT = {"v1-sb": ("v1", "db"), "v2-sb": ("v2", "db"), "v3-sb-foreign": ("v3", "other")}


@dataclasses.dataclass(frozen=True)
class Verified:
    dir: Path
    releases: dict[str, d.Release]
    firmware: d.Firmware  # OVMF's Secure Boot code, our keys enrolled, systemd-boot signed by db
    seconds: float


def _release(images: d.Images, out: Path, variant: str, sign: str | None, keys: sb.Keys) -> None:
    base = images.base
    src = images.releases[variant]
    args = ["release", "create", "--image", src.image, "--product", d.PRODUCT, "--version", src.version,
            "--compatible", d.HARDWARE, "--kernel", base.vmlinuz, "--initrd", base.initrd, "--options", d.OPTIONS,
            "--level", "6", "--verity", "-o", out]
    if sign is not None:
        args += ["--build-uki", "--secure-boot-key", keys.key(sign), "--secure-boot-cert", keys.cert(sign)]
    d._abflip(*args)


def build_verified(cache: Path, images: d.Images) -> Verified:
    key = d.inputs_key(images.key, Path(__file__), Path(sb.__file__), repr(VERITY), repr(SECURE_BOOT))
    t0 = time.monotonic()
    with d._cache_entry(cache, f"verified-{key}") as (out, ready):
        if not ready:
            keys = sb.make_keys(out / "secureboot" / "keys")
            sb.enrolled_vars(out / "secureboot" / "OVMF_VARS.fd", keys)
            sb.sign(vm.SYSTEMD_BOOT_EFI, out / "secureboot" / "systemd-bootx64.efi", keys)
            for name, (variant, sign) in {**VERITY, **SECURE_BOOT}.items():
                _release(images, out / f"release-{name}", variant, sign, keys)
    out = cache / f"verified-{key}"
    releases = {name: d.Release(name, images.releases[variant].version, images.releases[variant].image,
                                out / f"release-{name}")
                for name, (variant, _) in {**VERITY, **SECURE_BOOT}.items()}
    firmware = d.Firmware(code=sb.CODE, vars=out / "secureboot" / "OVMF_VARS.fd", qemu_args=sb.QEMU_ARGS,
                          systemd_boot=out / "secureboot" / "systemd-bootx64.efi")
    return Verified(out, releases, firmware, 0.0 if ready else time.monotonic() - t0)
