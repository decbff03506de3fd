"""Fixtures for the real-firmware tests: the cached Debian kernel and the stand-in OS versions built from it.

Tests marked `e2e` boot OVMF + systemd-boot under QEMU (TCG); they are skipped, with the missing tools named, when
the host lacks them. Deselect them with `-m "not e2e"`. The kernel download is cached in `$ABFLIP_E2E_CACHE`
(default `~/.cache/abflip-e2e`).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:  # vm.py uses applier.bootloader.esp_fat from this checkout
    sys.path.insert(0, str(_REPO))

from . import vm  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: boots real OVMF firmware and systemd-boot under QEMU (slow)")
    config.addinivalue_line("markers", "throttled: the reference device's repository serves images slowly")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    e2e_items = [item for item in items if item.get_closest_marker("e2e")]
    if not e2e_items:
        return
    missing = vm.missing_prerequisites()
    if not missing:
        return
    reason = (
        "real-firmware e2e test needs: " + ", ".join(missing)
        + " — install with: apt-get install " + " ".join(vm.APT_PACKAGES)
    )  # fmt: skip
    for item in e2e_items:
        item.add_marker(pytest.mark.skip(reason=reason))


@dataclasses.dataclass(frozen=True)
class OsImages:
    """The stand-in OS versions every firmware test installs."""

    v1: vm.OsVersion  # 1.0.0, good
    v2: vm.OsVersion  # 2.0.0, good
    v2_bad: vm.OsVersion  # 2.0.0, panics after reporting


@pytest.fixture(scope="session")
def kernel() -> tuple[Path, Path]:
    """(vmlinuz, modules_dir) of the cached Debian kernel (downloaded on first use)."""
    return vm.fetch_kernel(vm.default_cache_dir())


@pytest.fixture(scope="session")
def os_images(kernel: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> OsImages:
    vmlinuz, modules_dir = kernel
    out = tmp_path_factory.mktemp("os-images")

    def make(version: str, good: bool) -> vm.OsVersion:
        return vm.build_os_version(out, version=version, good=good, vmlinuz=vmlinuz, modules_dir=modules_dir)

    return OsImages(v1=make("1.0.0", True), v2=make("2.0.0", True), v2_bad=make("2.0.0", False))
