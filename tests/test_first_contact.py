"""First contact (issue 11): the README's set-up and test lines, abflip in a device image,
and the errors a new user meets first, each over the real CLI: the text and the exit code."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import site
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
from helpers import fake_erofs

from abflip import __version__
from abflip.demo import HARDWARE, PRODUCT
from abflip.sim import SimDevice
from applier.agent import Device
from builder.publish import publish_release, write_signed
from builder.storage.local import LocalStorage
from metadata.errors import UserError
from metadata.keys import KeyConfig, generate_file_key
from metadata.repository import Repository, init_repository

REPO = Path(__file__).resolve().parents[1]
ABFLIP = [sys.executable, "-m", "abflip.cli"]


def cli(*args: str, env: dict | None = None, cwd: Path = REPO, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([*ABFLIP, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env={**os.environ, **(env or {})})


def fails(r: subprocess.CompletedProcess, code: int, *texts: str) -> None:
    """The command failed with ``code`` and an `error (...)` line holding every text; no traceback."""
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "╭" not in r.stderr, r.stderr
    assert r.stderr.startswith("error ("), r.stderr
    for t in texts:
        assert t in r.stderr, (t, r.stderr)


def new_repo(path: Path, keys: Path) -> tuple[LocalStorage, KeyConfig]:
    storage = LocalStorage(path)
    write_signed(storage, init_repository(keys))
    return storage, KeyConfig.load(keys)


# -- items 1-3: the README's two lines, CI, a device's install layout --------------------------
def readme_block(heading: str) -> list[str]:
    """The command lines of the first ```sh block under the README heading starting with ``heading``."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(f"## {heading}"):]
    block = section[section.index("```sh\n") + 6:]
    block = block[:block.index("```")]
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_readme_setup_is_one_line_that_makes_a_venv_and_runs_the_demo():
    lines = readme_block("Set up and try it")
    assert len(lines) == 1, lines
    steps = [s.strip() for s in lines[0].split("&&")]
    install = next(s for s in steps if s.startswith("apt-get install"))
    for pkg in ("python3", "python3-venv", "erofs-utils"):
        assert pkg in install.split(), install  # a fresh Debian has no python3; venv needs python3-venv
    assert steps[0] == "apt-get update"
    assert "python3 -m venv .venv" in steps
    assert ".venv/bin/pip install -e '.[test]'" in steps  # never pip into the system Python (PEP 668)
    assert steps[-1] == "abflip demo" and ". .venv/bin/activate" in steps
    assert not any(s.startswith(("pip ", "pip3 ")) or "--break-system-packages" in s for s in steps)


def test_readme_test_line_is_what_ci_runs():
    lines = readme_block("Tests")
    assert len(lines) == 1, lines
    test_line = lines[0]
    assert test_line.endswith("&& .venv/bin/python -m pytest -q tests"), test_line
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    setup_line = readme_block("Set up and try it")[0]
    assert setup_line in ci and test_line in ci  # verbatim
    assert ci.index(setup_line) < ci.index(test_line) and ci[-1] == test_line
    # every tool CI installs is installed by the README's lines too
    ci_apt = re.search(r"apt_packages=\(([^)]*)\)", "\n".join(ci))[1].split()
    readme_apt = set(setup_line.split()) | set(test_line.split())
    assert set(ci_apt) <= readme_apt, set(ci_apt) - readme_apt
    assert os.access(REPO / ".ci" / "run", os.X_OK)


def test_gitignore_keeps_the_venv_out():
    # "/.venv/": the directory .venv at the top of the tree (gitignore(5); no git needed to read it)
    assert "/.venv/" in (REPO / ".gitignore").read_text().split()


def test_version_flag():
    r = cli("--version")
    assert (r.returncode, r.stdout) == (0, f"abflip {__version__}\n"), r
    from importlib.metadata import version

    assert version("abflip") == __version__  # pyproject takes it from abflip.__version__


def test_device_image_install_layout(tmp_path):
    """ci/image-install.sh into a staged root: /opt/abflip venv, the /usr/local/bin/abflip link the
    units run, the units installed and enabled; then that root's abflip runs."""
    wheels = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-index", "--no-build-isolation",
                        "--wheel-dir", str(wheels), str(REPO)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    root = tmp_path / "root"
    # Offline: abflip's own wheel only; its dependencies come from this test's environment (below).
    env = {**os.environ, "PIP_NO_DEPS": "1", "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(REPO / "ci" / "image-install.sh"), str(wheels), str(root)], capture_output=True,
                       text=True, env=env, timeout=300, cwd=tmp_path)
    venv = root / "opt" / "abflip"
    assert (venv / "bin" / "abflip").is_file(), r.stderr
    link = root / "usr" / "local" / "bin" / "abflip"
    assert os.readlink(link) == "../../../opt/abflip/bin/abflip"  # right in the image and in this staged tree
    purelib = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    (purelib / "zz-test-deps.pth").write_text("\n".join([sysconfig.get_path("purelib"), *site.getsitepackages()]) + "\n")
    out = subprocess.run([str(link), "--version"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert (out.returncode, out.stdout) == (0, f"abflip {__version__}\n"), out.stderr
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import abflip; print(abflip.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, check=True).stdout
    assert where.startswith(str(venv)), where  # the image's copy, not this checkout
    for unit in ("abflip.service", "abflip-health.service", "abflip-bless.service"):
        text = (root / "etc" / "systemd" / "system" / unit).read_text()
        exe = re.search(r"^ExecStart=(\S+)", text, re.M)[1]
        assert exe == "/usr/local/bin/abflip" and (root / exe.lstrip("/")) == link
    assert (root / "etc" / "systemd" / "system" / "abflip.timer").is_file()
    if shutil.which("systemctl"):
        assert (root / "etc/systemd/system/timers.target.wants/abflip.timer").is_symlink()
        assert (root / "etc/systemd/system/boot-complete.target.requires/abflip-health.service").is_symlink()
        assert (root / "etc/systemd/system/multi-user.target.wants/abflip-bless.service").is_symlink()


def test_demo_runs_and_prints_no_python_none(tmp_path):
    r = cli("demo", "--workdir", str(tmp_path / "demo"), timeout=600)
    assert r.returncode == 0, r.stderr
    assert "provisioned (entry abflip-1.0.0-a.conf, floor 1.0.0)" in r.stdout and r.stdout.endswith("demo: OK\n")
    assert "None" not in r.stdout, r.stdout


# -- item 5: a typo'd channel ----------------------------------------------------------------
def device_with(world, name: str, **kw) -> SimDevice:
    sim = SimDevice.create(world.tmp / name, repository_url=world.url,
                           trusted_root=(world.repo / "metadata" / "1.root.json").read_bytes(),
                           product=PRODUCT, hardware_id=HARDWARE, slot_size=8 << 20, retries=1, timeout=5.0, **kw)
    return sim


def test_typod_channel_names_the_channels_there_are(world):
    world.publish("1.0.0", channel="stable")
    world.publish("2.0.0", channel="beta")
    sim = device_with(world, "typo", channel="stabel")
    r = cli("check", "--config", str(sim.config_path))
    fails(r, 2, "error (user): channel 'stabel' of demo-os is not in the repository; it has: beta, stable",
          "check device.channel")


def test_misspelt_product_says_the_repository_has_none_of_its_channels(world):
    world.publish("1.0.0", channel="stable")
    sim = device_with(world, "product-typo", channel="stable")
    text = sim.config_path.read_text().replace('product = "demo-os"', 'product = "demo-0s"')
    assert text != sim.config_path.read_text()
    sim.config_path.write_text(text)
    r = cli("check", "--config", str(sim.config_path))
    fails(r, 2, "error (user): the repository has no channels for product 'demo-0s'", "check device.product")


def test_channels_of_a_delegated_product_over_http(world):
    """The product's channels live in its delegated role; another product's never show."""
    from metadata.staging import clear_staged, commit_staged, stage_delegation

    def load() -> Repository:
        return Repository.load(lambda n: world.storage.get(f"metadata/{n}"))

    for product in (PRODUCT, "other-os"):
        stage_delegation(load(), world.keys, product, [generate_file_key(world.keys.dir, f"ci-{product}")])
        write_signed(world.storage, commit_staged(load(), world.keys))
        clear_staged(world.keys.dir)
    world.publish("1.0.0", channel="stable")
    world.publish("2.0.0", channel="edge")
    assert "demo-os/channels/edge.json" in load().delegated[PRODUCT].signed.targets
    sim = device_with(world, "deleg")
    dev = Device(sim.config)
    client = dev.offer(dev.session())._client()
    client.refresh()
    assert client.channels(PRODUCT) == ["edge", "stable"]
    assert client.channels("other-os") == []
    assert client.channels("no-such-product") == []


# -- item 7: repo init on an existing repository ----------------------------------------------
def test_repo_init_on_an_existing_repository_creates_nothing(tmp_path):
    assert cli("repo", "init", "--keys", str(tmp_path / "k1"), "--to", str(tmp_path / "r")).returncode == 0
    before = sorted(p.name for p in (tmp_path / "r" / "metadata").iterdir())
    r = cli("repo", "init", "--keys", str(tmp_path / "k2"), "--to", str(tmp_path / "r"))
    fails(r, 2, f"error (user): {tmp_path / 'r'} already holds a repository (metadata/1.root.json)", "nothing was created")
    assert not (tmp_path / "k2").exists()
    assert sorted(p.name for p in (tmp_path / "r" / "metadata").iterdir()) == before
    assert cli("repo", "init", "--keys", str(tmp_path / "k2"), "--to", str(tmp_path / "r2")).returncode == 0  # a retry


def test_repo_init_whose_write_fails_leaves_no_keys_behind(tmp_path):
    (tmp_path / "file").write_text("")
    r = cli("repo", "init", "--keys", str(tmp_path / "keys"), "--to", str(tmp_path / "file" / "repo"))
    fails(r, 5, "error (storage): cannot write")
    assert not (tmp_path / "keys").exists()
    # a keys directory that existed keeps what it had, and only that
    (tmp_path / "keys2").mkdir()
    (tmp_path / "keys2" / "README").write_text("mine")
    r = cli("repo", "init", "--keys", str(tmp_path / "keys2"), "--to", str(tmp_path / "file" / "repo"))
    assert r.returncode == 5
    assert [p.name for p in (tmp_path / "keys2").iterdir()] == ["README"]
    r = cli("repo", "init", "--keys", str(tmp_path / "keys"), "--to", str(tmp_path / "repo"))
    assert r.returncode == 0, r.stderr  # the retry is not refused with "keys already holds a key configuration"


# -- item 8: publish with another repository's keys -------------------------------------------
def test_publish_with_another_repositorys_keys_uploads_nothing(world, tmp_path):
    new_repo(tmp_path / "other-repo", tmp_path / "other-keys")
    r = cli("publish", str(world.built["1.0.0"]), "--to", str(world.repo), "--keys", str(tmp_path / "other-keys"))
    fails(r, 2, "error (user): role targets needs 1 signature(s), only 0 of its key(s) are available here",
          "they belong to another repository", "nothing was uploaded")
    assert not (world.repo / "targets").exists() or not any((world.repo / "targets").rglob("*"))
    assert cli("publish", str(world.built["1.0.0"]), "--to", str(world.repo), "--keys",
               str(world.keys.dir)).returncode == 0


def test_publish_checks_keys_before_uploading_in_the_library(world, tmp_path):
    _, other = new_repo(tmp_path / "other-repo", tmp_path / "other-keys")
    with pytest.raises(UserError, match="role targets needs 1 signature"):
        publish_release(world.built["1.0.0"], world.storage, other, channel="stable")
    assert not (world.repo / "targets").exists()


# -- item 9: no Python None in human output ---------------------------------------------------
def test_status_and_check_of_an_unprovisioned_device_say_unknown(world):
    world.publish("1.0.0")
    sim = device_with(world, "fresh")
    r = cli("status", "--config", str(sim.config_path))
    assert r.returncode == 0, r.stderr
    assert "None" not in r.stdout, r.stdout
    assert "booted:  slot a (unknown version, entry unknown)" in r.stdout
    assert "floor:   none" in r.stdout and "not provisioned: `abflip provision RELEASE`" in r.stdout
    r = cli("check", "--config", str(sim.config_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("1.0.0 is available (running an unknown version)"), r.stdout
    sim.cmdline.write_text("ro\n")  # the booted slot cannot be told
    r = cli("status", "--config", str(sim.config_path))
    assert r.returncode == 0 and "None" not in r.stdout, r.stdout
    assert "booted:  unknown slot (every write is refused)" in r.stdout


# -- item 10 ---------------------------------------------------------------------------------
def test_release_create_without_source_date_epoch_records_the_current_time(world, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    args = ["release", "create", "--image", str(world.built["1.0.0.img"]), "--product", PRODUCT, "--version", "9.0.0",
            "--compatible", HARDWARE, "--kernel", str(world.built["1.0.0"] / "vmlinuz"), "--chunk-size", "262144",
            "--window", "262144"]
    t0 = int(time.time())
    r = subprocess.run([*ABFLIP, *args, "-o", str(tmp_path / "now")], capture_output=True, text=True, env=env, timeout=120)
    t1 = int(time.time())
    assert r.returncode == 0, r.stderr
    assert t0 <= json.loads((tmp_path / "now" / "release.json").read_text())["created"] <= t1
    r = cli(*args, "-o", str(tmp_path / "epoch"), env={"SOURCE_DATE_EPOCH": "1700000000"})
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "epoch" / "release.json").read_text())["created"] == 1700000000


def test_repo_status_says_how_many_signatures_are_needed(tmp_path):
    assert cli("repo", "init", "--keys", str(tmp_path / "k"), "--to", str(tmp_path / "r"), "--keys-per-role",
               "root=3", "--threshold", "root=2").returncode == 0
    r = cli("repo", "status", "--repo", str(tmp_path / "r"))
    assert r.returncode == 0, r.stderr
    root = next(line for line in r.stdout.splitlines() if line.startswith("root "))
    assert " 3 of 2 needed " in root, root
    assert not re.search(r"\b\d+/\d+\b", r.stdout), r.stdout


def on_terminal(args: list[str], cwd: Path, timeout: float = 300) -> tuple[int, str]:
    """Run the CLI with stderr on a pseudo-terminal (where progress bars are drawn); return its
    exit code and everything it drew there."""
    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": "160", "TERM": "xterm"}
    proc = subprocess.Popen([*ABFLIP, *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave,
                            cwd=cwd, env=env)
    os.close(slave)
    drawn = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                data = os.read(master, 1 << 16)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            drawn += data
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(timeout=10), drawn.decode("utf-8", "replace")


def test_release_create_bar_knows_its_total_from_the_start(tmp_path, world):
    image = tmp_path / "big.img"
    image.write_bytes(fake_erofs(os.urandom(8 << 20)))  # incompressible at level 19: the bar is drawn many times
    code, drawn = on_terminal(["release", "create", "--image", str(image), "--product", PRODUCT, "--version", "9.0.0",
                               "--compatible", HARDWARE, "--kernel", str(world.built["1.0.0"] / "vmlinuz"),
                               "--level", "19", "--chunk-size", str(4 << 20), "--window", "0", "--threads", "1",
                               "-o", str(tmp_path / "out")], tmp_path)
    assert code == 0, drawn
    assert "compressing" in drawn and "/8.4 MB" in drawn, drawn
    assert "/?" not in drawn, drawn


def test_repo_verify_deep_draws_a_progress_bar(world, tmp_path):
    world.publish("1.0.0")
    code, drawn = on_terminal(["repo", "verify", str(world.repo), "--deep"], tmp_path)
    assert code == 0, drawn
    assert "verifying demo-os 1.0.0 (stable)" in drawn, drawn


# -- ten more user mistakes: the error text and the exit code ---------------------------------
def test_mistake_repo_init_to_an_http_url(tmp_path):
    r = cli("repo", "init", "--keys", str(tmp_path / "k"), "--to", "http://updates.example.com/repo", cwd=tmp_path)
    fails(r, 2, "error (user): http://updates.example.com/repo is an HTTP URL: abflip reads repositories over HTTP "
                "but writes them only to a directory or s3://bucket/prefix")
    assert list(tmp_path.iterdir()) == []  # no keys, no local directory named 'http:'


def test_mistake_publish_to_an_https_url(world):
    r = cli("publish", str(world.built["1.0.0"]), "--to", "https://updates.example.com/repo", "--keys",
            str(world.keys.dir))
    fails(r, 2, "is an HTTP URL", "pass the directory or bucket the web server serves")


def test_mistake_publish_a_file_instead_of_the_release_directory(world):
    r = cli("publish", str(world.built["1.0.0"] / "release.json"), "--to", str(world.repo), "--keys",
            str(world.keys.dir))
    fails(r, 2, "holds no release.json (it is a file, not a release directory)",
          "pass the directory 'abflip release create' wrote")


def test_mistake_publish_to_a_misspelt_repository_directory(world, tmp_path):
    r = cli("publish", str(world.built["1.0.0"]), "--to", str(tmp_path / "rpeo"), "--keys", str(world.keys.dir))
    fails(r, 2, f"error (user): {tmp_path / 'rpeo'} is not a repository: it does not exist",
          "'abflip repo init' creates a repository")
    assert not (tmp_path / "rpeo").exists()


def test_mistake_repo_status_of_a_missing_directory(tmp_path):
    r = cli("repo", "status", "--repo", str(tmp_path / "nope"))
    fails(r, 2, f"error (user): {tmp_path / 'nope'} is not a repository: it does not exist")


def test_mistake_promote_in_a_directory_that_is_not_a_repository(world):
    r = cli("channel", "promote", PRODUCT, "1.0.0", "--to", "stable", "--repo", str(world.built["1.0.0"]), "--keys",
            str(world.keys.dir))
    fails(r, 2, "holds no abflip repository (no metadata/1.root.json)", "the directory holding metadata/ and targets/")


def test_mistake_repo_refresh_of_a_missing_directory(world, tmp_path):
    r = cli("repo", "refresh", "--repo", str(tmp_path / "gone"), "--keys", str(world.keys.dir))
    fails(r, 2, "is not a repository: it does not exist")


def test_mistake_repo_init_keys_is_an_existing_file(tmp_path):
    (tmp_path / "keys.pem").write_text("a key")
    r = cli("repo", "init", "--keys", str(tmp_path / "keys.pem"), "--to", str(tmp_path / "repo"))
    fails(r, 2, f"error (user): --keys {tmp_path / 'keys.pem'} is a file", "nothing was created")
    assert not (tmp_path / "repo").exists() and (tmp_path / "keys.pem").read_text() == "a key"


def test_mistake_repo_status_with_a_keys_directory_without_keys(world, tmp_path):
    r = cli("repo", "status", "--repo", str(world.repo), "--keys", str(tmp_path))
    fails(r, 2, f"error (user): --keys {tmp_path} holds no key configuration (keys.json)")


def test_mistake_trusted_root_is_not_a_root(world):
    sim = device_with(world, "badroot")
    (sim.root / "root.json").write_bytes((world.repo / "metadata" / "timestamp.json").read_bytes())
    r = cli("check", "--config", str(sim.config_path))
    fails(r, 2, f"error (user): the trusted root {sim.root / 'root.json'} is not a valid TUF root",
          "repository.trusted_root must name the repository's root.json")


def test_mistake_provision_names_no_slot(world):
    sim = device_with(world, "slotc")
    r = cli("provision", str(world.built["1.0.0"]), "--slot", "c", "--config", str(sim.config_path))
    fails(r, 2, "error (user): --slot 'c': expected a or b")
