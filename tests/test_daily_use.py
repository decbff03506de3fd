"""First contact and daily use, second pass (issue 23): every way a command ends is in the
documented form (``error (<blame>): ...`` + ``hint:``, JSON under ``--json``), over the real CLI
as a process: usage errors, signals, a closed stdout, and the producer's and the key holders'
mistakes. Each story checks the text, the exit code, and that nothing changed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import fake_erofs
from test_agent_kill import _Slow
from test_agent_lifecycle import agent

from abflip.demo import HARDWARE, PRODUCT

REPO = Path(__file__).resolve().parents[1]
ABFLIP = [sys.executable, "-m", "abflip.cli"]


def cli(*args: str, env: dict | None = None, cwd: Path = REPO, timeout: float = 180,
        input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*ABFLIP, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env={**os.environ, **(env or {})}, input=input)


def fails(r: subprocess.CompletedProcess, code: int, *texts: str) -> None:
    """Failed with ``code``, an ``error (...)`` line holding every text and a hint; no traceback, no box."""
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "╭" not in r.stderr and "╭" not in r.stdout, r.stderr
    assert r.stderr.startswith("error ("), r.stderr
    assert "\n  hint: " in r.stderr, r.stderr
    for t in texts:
        assert t in r.stderr, (t, r.stderr)


# -- usage errors: the documented form, not typer's box ----------------------------------------
@pytest.mark.parametrize("args, text", [
    (["status", "--bogus"], "error (user): abflip status: no such option: --bogus"),
    (["publish"], "error (user): abflip publish: missing argument RELEASE_DIR"),
    (["publish", "x", "--to", "y"], "error (user): abflip publish: missing option '--keys'"),
    (["channel", "rollout", "p", "--channel", "c", "--percent", "ten", "--repo", "r", "--keys", "k"],
     "error (user): abflip channel rollout: invalid value for '--percent'"),
    (["repo", "frobnicate"], "error (user): abflip repo: no such command 'frobnicate'"),
])
def test_usage_errors_are_in_the_documented_form(args, text):
    r = cli(*args)
    fails(r, 2, text, f"hint: '{text.split(': ')[1]} --help' lists its arguments and options")
    assert r.stdout == ""


def test_usage_errors_under_json_are_json():
    r = cli("status", "--json", "--bogus")
    fails(r, 2, "no such option: --bogus")
    err = json.loads(r.stdout)["error"]
    assert (err["blame"], err["type"]) == ("user", "UserError") and "--bogus" in err["message"] and err["hint"]
    # a streaming command's stream ends with an error event, as its other errors do
    r = cli("download", "--json", "--percent", "3")
    fails(r, 2, "no such option: --percent")
    ev = json.loads(r.stdout.strip().splitlines()[-1])
    assert ev["event"] == "error" and ev["error"]["blame"] == "user"


# -- a closed stdout is a normal end -------------------------------------------------------------
def test_a_reader_that_closes_stdout_early_is_a_quiet_normal_end(world):
    world.publish("1.0.0")
    sim, _ = world.device()
    for args in (["status", "--json"], ["status", "--json", "--config=" + str(sim.config_path)], ["--help"],
                 ["man"]):
        if "--config=" not in " ".join(args) and args[0] == "status":
            args = [*args, "--config", str(sim.config_path)]
        p = subprocess.Popen([*ABFLIP, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
        p.stdout.read(10)
        p.stdout.close()  # `| head -c 10`
        err = p.stderr.read().decode()
        assert p.wait(60) == 0, (args, err)
        assert err == "", (args, err)


# -- signals: SIGTERM (systemd stopping the unit) and SIGINT (Ctrl-C) without a terminal ---------
def _start(world, sim, *args: str) -> subprocess.Popen:
    _Slow.sent = 0
    _Slow.hold_boot_files.clear()
    world.handler = _Slow
    return subprocess.Popen([*ABFLIP, *args, "--config", str(sim.config_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)


@pytest.mark.parametrize("sig, code, command", [(signal.SIGTERM, 143, "download"), (signal.SIGINT, 130, "install")])
def test_a_signal_mid_download_ends_with_an_error_event_and_the_chunk_to_resume_at(world, sig, code, command):
    world.publish("1.0.0")
    sim, dev = agent(world)
    world.publish("2.0.0")
    proc = _start(world, sim, command, "--json")
    watchdog = threading.Timer(90, proc.kill)
    watchdog.start()
    try:
        for line in proc.stdout:
            ev = json.loads(line)
            assert ev["event"] == "progress", ev
            if ev.get("chunk") == 2:
                break
        proc.send_signal(sig)
        out, err = proc.communicate(60)
    finally:
        watchdog.cancel()
        _Slow.hold_boot_files.set()
    assert proc.returncode == code, (proc.returncode, err)
    done = dev.status()["target"]["chunks_done"]
    assert dev.status()["state"] == "downloading" and done >= 2
    total = dev.status()["target"]["chunks_total"]
    name = signal.Signals(sig).name
    last = json.loads(out.strip().splitlines()[-1])
    assert last["event"] == "error" and last["error"]["blame"] == "interrupted", last
    assert last["error"]["message"] == (f"interrupted ({name}); the next run resumes at chunk {done} of {total} "
                                        "(2.0.0 into slot b)")
    assert err.startswith(f"error (interrupted): interrupted ({name}); the next run resumes at chunk {done}"), err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    from applier import history

    assert history.read(sim.state_dir)[-1]["what"] == f"download interrupted at chunk {done} of {total} of 2.0.0"
    assert [e for e in sim.entries() if "-b" in e] == [] and sim.boot().slot == "a"
    r = cli("download", "--json", "--config", sim.config_path)  # the next run resumes there
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["result"]["resumed_at_chunk"] == done


def test_sigterm_without_json_prints_the_error_line(world):
    world.publish("1.0.0")
    sim, dev = agent(world)
    world.publish("2.0.0")
    proc = _start(world, sim, "download")
    try:
        deadline = time.monotonic() + 60
        while (dev.status()["target"] or {}).get("chunks_done", 0) < 1:
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(60)
    finally:
        _Slow.hold_boot_files.set()
    assert proc.returncode == 143 and out == "", (out, err)
    assert err.startswith("error (interrupted): interrupted (SIGTERM); the next run resumes at chunk "), err
    assert "\n  hint: run it again" in err


def test_sigterm_stops_serve_normally(tmp_path):
    """SIGTERM while `abflip serve` serves: how a server is stopped, not an error."""
    port = _free_port()
    proc = subprocess.Popen([*ABFLIP, "serve", str(tmp_path), "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    assert "serving" in proc.stdout.readline()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(30)
    assert proc.returncode == 0 and "Traceback" not in err, err


def test_an_interrupted_release_create_leaves_nothing(tmp_path, built):
    image = tmp_path / "big.img"
    image.write_bytes(fake_erofs(os.urandom(48 << 20)))  # incompressible at level 19 on one thread: seconds of work
    proc = subprocess.Popen([*ABFLIP, "release", "create", "--image", str(image), "--product", PRODUCT, "--version",
                             "9.0.0", "--compatible", HARDWARE, "--kernel", str(built["1.0.0"] / "vmlinuz"),
                             "--level", "19", "--threads", "1", "--chunk-size", str(4 << 20), "--window", "0",
                             "-o", str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO)
    time.sleep(1.5)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(60)
    assert proc.returncode == 143, err
    assert err.startswith("error (interrupted): interrupted (SIGTERM)\n  hint: run the command again"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.img"]  # no release, no staging directory


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- repo verify and refresh: what the publisher is told --------------------------------------
def test_repo_verify_with_a_root_that_is_not_a_root_is_a_user_error(world, tmp_path):
    world.publish("1.0.0")
    r = cli("repo", "verify", world.repo, "--root", world.repo / "metadata" / "timestamp.json")
    fails(r, 2, "error (user): the trusted root given (--root) is not a TUF root: Expected 'root', got 'timestamp'",
          "pass the root.json devices are shipped with")
    (tmp_path / "junk.json").write_text("{not json")
    fails(cli("repo", "verify", world.repo, "--root", tmp_path / "junk.json"), 2, "is not a TUF root")
    fails(cli("repo", "verify", world.repo, "--root", tmp_path / "nope.json"), 2,
          f"error (user): cannot read --root {tmp_path / 'nope.json'}: No such file or directory")


def test_repo_verify_of_a_directory_without_a_repository_blames_the_path_not_the_network(world):
    r = cli("repo", "verify", world.built["1.0.0"])
    fails(r, 2, f"error (user): {world.built['1.0.0']} holds no abflip repository (metadata/1.root.json not found)",
          "check the repository's path, bucket prefix or URL")
    assert "network" not in r.stderr


def test_expired_metadata_tells_the_publisher_what_to_run(world):
    from datetime import datetime, timedelta, timezone

    world.publish("1.0.0", now=datetime.now(timezone.utc) - timedelta(days=3))  # timestamp: 1 day
    r = cli("repo", "verify", world.repo)
    fails(r, 3, "error (repository): TUF refresh failed: timestamp.json is expired",
          f"hint: re-sign it: abflip repo refresh --repo {world.repo} --keys KEYS")
    assert "Tell the publisher" not in r.stderr
    world.publish("2.0.0", now=datetime.now(timezone.utc) - timedelta(days=100))  # targets: 90 days
    r = cli("repo", "refresh", "--repo", world.repo, "--keys", world.keys.dir)  # re-signs what it can ...
    fails(r, 3, "error (repository): targets v", "expired", "its key holders must re-sign it (abflip repo rotate "
          "targets with no change, then sign and commit) (re-signed meanwhile: ", "timestamp.json")
    r = cli("repo", "verify", world.repo)  # ... and the offline role is what is left
    fails(r, 3, "TUF refresh failed: New targets is expired", "targets is offline: its key holders re-sign it with a rotation that "
          f"changes nothing (abflip repo rotate targets --keys KEYS --to {world.repo}")
    r = cli("repo", "refresh", "--repo", world.repo, "--keys", world.keys.dir, "--json")
    assert r.returncode == 3 and json.loads(r.stdout)["error"]["blame"] == "repository"


# -- the demo: a workdir that cannot be one, and a second run in the same one ------------------
def test_demo_workdir_mistakes_and_a_second_run(tmp_path):
    (tmp_path / "file").write_text("mine")
    fails(cli("demo", "--workdir", tmp_path / "file"), 2, f"error (user): --workdir {tmp_path / 'file'} is not a "
          "directory", "pass a new or empty directory")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    fails(cli("demo", "--workdir", tmp_path / "other"), 2, "holds files the demo did not make (notes.txt)")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine" and (tmp_path / "file").read_text() == "mine"
    work = tmp_path / "missing" / "parent" / "demo"  # parents are made
    first = cli("demo", "--workdir", work, timeout=600)
    assert first.returncode == 0 and first.stdout.endswith("demo: OK\n"), first.stderr
    again = cli("demo", "--workdir", work, timeout=600)  # README: every step can be run again
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(f"== clearing the earlier demo in {work}\n") and again.stdout.endswith("demo: OK\n")


# -- release create and image build: the image's type, and what is there already ---------------
def _release(image: Path, out: Path, kernel: Path, *extra: str) -> subprocess.CompletedProcess:
    return cli("release", "create", "--image", image, "--product", PRODUCT, "--version", "9.0.0", "--compatible",
               HARDWARE, "--kernel", kernel, "--chunk-size", 262144, "--window", 262144, "-o", out, *extra)


def test_release_create_checks_the_image_is_a_filesystem_of_its_type(built, tmp_path):
    kernel = built["1.0.0"] / "vmlinuz"
    junk = tmp_path / "junk.img"
    junk.write_bytes(os.urandom(1 << 20))
    fails(_release(junk, tmp_path / "out", kernel), 2,
          f"error (user): --image {junk} is no erofs, squashfs or ext4 image", "build the image with 'abflip image build'")
    erofs = built["1.0.0.img"]
    fails(_release(erofs, tmp_path / "out", kernel, "--fstype", "squashfs"), 2,
          f"--image {erofs} is an erofs image, not squashfs", "pass --fstype erofs")
    assert not (tmp_path / "out").exists()
    r = _release(erofs, tmp_path / "out", kernel)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "out" / "release.json").read_text())["image"]["fstype"] == "erofs"


def test_outputs_are_not_overwritten_without_force(built, tmp_path):
    kernel = built["1.0.0"] / "vmlinuz"
    out = tmp_path / "rel"
    assert _release(built["1.0.0.img"], out, kernel).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = _release(built["2.0.0.img"], out, kernel)
    fails(r, 2, f"error (user): {out} already holds a release (release.json)", "pass --force to replace it")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    r = _release(built["2.0.0.img"], out, kernel, "--force")
    assert r.returncode == 0, r.stderr
    assert (out / "rootfs.img.zst").read_bytes() != before["rootfs.img.zst"]

    from abflip.demo import make_rootfs

    tree = make_rootfs(tmp_path / "tree", "1.0.0", size=100_000)
    img = tmp_path / "rootfs.img"
    img.write_bytes(b"precious")
    fails(cli("image", "build", tree, "-o", img), 2, f"error (user): output {img} exists", "pass --force")
    assert img.read_bytes() == b"precious"
    r = cli("image", "build", tree, "-o", img, "--force", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["fstype"] == "erofs", r.stderr


# -- keys: what the key holders' commands leave behind --------------------------------------
def _keys_json(keys: Path) -> dict:
    return json.loads((keys / "keys.json").read_text())


def test_rotate_root_with_a_revoked_prefix_drops_the_key_from_keys_json(tmp_path):
    keys, repo = tmp_path / "keys", tmp_path / "repo"
    assert cli("repo", "init", "--keys", keys, "--to", repo, "--keys-per-role", "root=2").returncode == 0
    old = [k["keyid"] for k in _keys_json(keys)["roles"]["root"]]
    r = cli("repo", "rotate", "root", "--keys", keys, "--to", repo, "--generate", "1", "--revoke", old[1][:12])
    assert r.returncode == 0, r.stderr
    now = [k["keyid"] for k in _keys_json(keys)["roles"]["root"]]
    assert old[1] not in now and old[0] in now and len(now) == 2  # docs/keys.md: the revoked key is dropped
    assert cli("repo", "commit", "--keys", keys, "--to", repo).returncode == 0
    root = json.loads((repo / "metadata" / "2.root.json").read_text())
    assert sorted(root["signed"]["roles"]["root"]["keyids"]) == sorted(now)
    assert old[1] in {s["keyid"] for s in root["signatures"]}  # it signed the handover


def test_repo_sign_refuses_a_key_that_is_not_a_signer_and_commit_publishes_real_signatures(tmp_path):
    """Root 2 of 2, the second key on its holder's token (not here): the staged root names it; a
    wrong key is refused with nothing written; the right one signs; commit publishes."""
    keys, repo = tmp_path / "keys", tmp_path / "repo"
    assert cli("repo", "init", "--keys", keys, "--to", repo, "--keys-per-role", "root=2", "--threshold",
               "root=2").returncode == 0
    token = tmp_path / "token.pem"
    (keys / "root-2.pem").rename(token)
    r = cli("repo", "rotate", "root", "--keys", keys, "--to", repo, "--generate", "1", "--threshold", "2")
    assert r.returncode == 0, r.stderr
    staged = keys / "staged" / "2.root.json"
    before = staged.read_bytes()
    for wrong in (keys / "targets.pem", keys / "timestamp.pem"):
        r = cli("repo", "sign", staged, "--key", wrong)
        fails(r, 2, "error (user): key ", "is not a key that signs 2.root.json (root v2); its signers: ",
              "the staged file is unchanged")
        assert staged.read_bytes() == before
    fails(cli("repo", "commit", "--keys", keys, "--to", repo), 2, "role root v2 needs 1 more from the previous root")
    r = cli("repo", "sign", staged, "--key", token)
    assert r.returncode == 0 and "; 3 signature(s)" in r.stdout, r.stdout + r.stderr
    assert cli("repo", "commit", "--keys", keys, "--to", repo).returncode == 0
    published = json.loads((repo / "metadata" / "2.root.json").read_text())["signatures"]
    assert len(published) == 3 and all(s["sig"] for s in published)  # no empty placeholder reaches devices
    assert cli("repo", "verify", repo).returncode == 0


def test_delegating_a_product_twice_leaves_no_orphan_key(tmp_path):
    keys, repo = tmp_path / "keys", tmp_path / "repo"
    assert cli("repo", "init", "--keys", keys, "--to", repo).returncode == 0
    assert cli("repo", "delegate", PRODUCT, "--keys", keys, "--to", repo, "--generate").returncode == 0
    assert cli("repo", "commit", "--keys", keys, "--to", repo).returncode == 0
    before = sorted(p.name for p in keys.iterdir()), (keys / "keys.json").read_bytes()
    r = cli("repo", "delegate", PRODUCT, "--keys", keys, "--to", repo, "--generate")
    fails(r, 2, f"error (user): {PRODUCT} is already delegated")
    assert (sorted(p.name for p in keys.iterdir()), (keys / "keys.json").read_bytes()) == before
    r = cli("repo", "rotate", PRODUCT, "--keys", keys, "--to", repo, "--generate", "1", "--threshold", "5")
    fails(r, 2, f"role {PRODUCT} would have threshold 5 with 2 key(s)")
    assert (sorted(p.name for p in keys.iterdir()), (keys / "keys.json").read_bytes()) == before


def test_gc_dry_run_checks_the_keys_as_the_real_run(world, tmp_path):
    for v in ("1.0.0", "2.0.0", "3.0.0"):
        world.publish(v)
    other = tmp_path / "other-keys"
    assert cli("repo", "init", "--keys", other, "--to", tmp_path / "other-repo").returncode == 0
    for args in (["--dry-run"], []):
        r = cli("repo", "gc", "--repo", world.repo, "--keys", other, "--keep", "1", *args)
        fails(r, 2, "error (user): role targets needs 1 signature(s), only 0 of its key(s) are available here",
              "nothing was removed")
    r = cli("repo", "gc", "--repo", world.repo, "--keys", world.keys.dir, "--keep", "1", "--dry-run")
    assert r.returncode == 0 and "the keys can sign what the real run re-signs" in r.stdout, r.stdout + r.stderr
    r = cli("repo", "gc", "--repo", world.repo, "--keep", "1", "--dry-run")
    assert r.returncode == 0 and "keys not checked (pass --keys" in r.stdout
    fails(cli("repo", "gc", "--repo", world.repo, "--keys", world.keys.dir, "--keep", "0"), 2,
          "error (user): --keep 0: every product keeps at least its newest release", "hint: pass --keep 1 or more")


# -- messages that say what happened ------------------------------------------------------------
@pytest.mark.skipif(os.geteuid() != 0, reason="running a command as another user needs root")
@pytest.mark.parametrize("command", ["status", "check", "download", "install", "mark-good", "rollback", "boot-check"])
def test_device_commands_as_a_user_who_is_not_root_say_run_as_root(world, command):
    import shutil
    import tempfile

    from abflip.sim import SimDevice
    from applier.agent import Device

    world.publish("1.0.0")
    # outside pytest's own temporary tree, which any pytest starting meanwhile makes 0700 again
    base = Path(tempfile.mkdtemp(prefix="abflip-not-root-"))
    try:
        os.chmod(base, 0o755)  # the user may reach the device's files, not read or write them
        sim = SimDevice.create(base / "dev", repository_url=world.url, product=PRODUCT, hardware_id=HARDWARE,
                               trusted_root=(world.repo / "metadata" / "1.root.json").read_bytes(),
                               slot_size=8 << 20, retries=1, timeout=5.0)
        sim.provision(world.built["1.0.0.img"], slot="a", version="1.0.0", product=PRODUCT)
        dev = Device(sim.config)
        dev.mark_good()
        os.chmod(sim.root, 0o755)
        os.chmod(sim.config_path, 0o644)
        before = dev.status()
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *ABFLIP, command,
                            "--config", str(sim.config_path)], capture_output=True, text=True, cwd="/", timeout=120,
                           env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        fails(r, 2, "cannot be read by this user (uid 65534): abflip's device commands run as root",
              "hint: run it as root (sudo abflip ...); nothing was changed")
        assert "free space" not in r.stderr and "invalid" not in r.stderr
        assert dev.status() == before
    finally:
        shutil.rmtree(base)


def test_a_quoted_number_in_the_configuration_says_to_drop_the_quotes(world):
    sim, _ = world.device()
    text = sim.config_path.read_text()
    assert "\ntries = 3\n" in text
    sim.config_path.write_text(text.replace("\ntries = 3\n", '\ntries = "3"\n'))
    r = cli("status", "--config", sim.config_path)
    fails(r, 2, f"error (user): {sim.config_path}: boot.tries must be an integer from 1 to",
          "hint: write it without quotes (tries = 3): in quotes TOML reads a string")
    assert "check the command line" not in r.stderr


def test_commit_with_nothing_staged_says_so(world):
    r = cli("repo", "commit", "--keys", world.keys.dir, "--to", world.repo)
    fails(r, 2, f"error (user): nothing is staged in {world.keys.dir / 'staged'}: there is nothing to commit",
          "stage a change first ('abflip repo rotate', 'delegate' or 'bins')")


def test_hints_name_only_configuration_keys_that_exist():
    """Every ``section.key`` a hint names (in the code, with section a configuration section) is a
    key the configuration file has: a hint must not send anyone to a key that is not there."""
    import ast
    import re

    from applier.config import KNOWN_KEYS, SLOT_KEYS

    ref = re.compile(r"(?<![\w./-])(" + "|".join(KNOWN_KEYS) + r")\.([a-z_]+)(?:\.([a-z_]+))?\b(?![.(])")
    bad, seen = [], 0
    for top in ("abflip", "applier", "builder", "metadata"):
        for f in sorted((REPO / top).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text())):
                hints = [k.value for k in getattr(node, "keywords", []) if k.arg == "hint"]
                if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "hint" for t in node.targets):
                    hints.append(node.value)
                for h in hints:
                    for s in (c.value for c in ast.walk(h) if isinstance(c, ast.Constant) and isinstance(c.value, str)):
                        for m in ref.finditer(s):
                            seen += 1
                            sec, key, sub = m.groups()
                            ok = key in KNOWN_KEYS[sec] or (sec == "slots" and key in ("a", "b")
                                                            and (sub is None or sub in SLOT_KEYS))
                            if not ok:
                                bad.append(f"{f.relative_to(REPO)}:{node.lineno}: {m[0]}")
    assert seen > 10 and bad == [], bad


def test_every_blame_and_exit_code_is_one_the_readme_lists():
    import importlib
    import pkgutil
    import re

    from metadata.errors import Error

    for top in ("abflip", "applier", "builder", "metadata"):
        pkg = importlib.import_module(top)
        for info in pkgutil.walk_packages(pkg.__path__, f"{top}."):
            importlib.import_module(info.name)

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    readme = (REPO / "README.md").read_text()
    para = readme[readme.index("Exit codes: 0 ok"):]
    para = para[:para.index("\n\n")]
    listed = set(re.findall(r"`(\w+)`", para[para.index("the blame being one of"):]))
    codes = {int(c) for c in re.findall(r"\b(\d+)\b", para[:para.index("Every error prints")])}
    found = {cls.blame: cls for cls in [Error, *subclasses(Error)] if not cls.__module__.startswith("tests")}
    assert set(found) <= listed, set(found) - listed
    for blame, cls in found.items():
        code = cls.exit_code if not isinstance(cls.exit_code, property) else None
        assert code in codes, (blame, cls, code)
    assert {"interrupted", "storage"} <= set(found)


def test_every_error_class_has_a_hint():
    """README: every error prints a hint line. Each class abflip raises carries a default hint."""
    import importlib
    import pkgutil

    from metadata.errors import Error

    for top in ("abflip", "applier", "builder", "metadata"):
        for info in pkgutil.walk_packages(importlib.import_module(top).__path__, f"{top}."):
            importlib.import_module(info.name)

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    missing = [c.__qualname__ for c in subclasses(Error) if not c.default_hint and c.__module__.split(".")[0] in
               ("abflip", "applier", "builder", "metadata")]
    assert missing == [], missing
