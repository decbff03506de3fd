"""The release engineer's commands end to end on a repository directory (repo init with
thresholds, delegate, rotate, sign by an offline key holder, commit, status, refresh), and
the TUF conformance client (``abflip-tuf-client``) as a subprocess against a World
repository over real HTTP."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from typer.testing import CliRunner

from abflip.cli import app
from abflip.httpserver import RepoHandler
from metadata.repository import Repository

ROOT = Path(__file__).resolve().parent.parent
CLIENT = [sys.executable, "-m", "applier.conformance"]


def abflip(*args, code: int = 0) -> dict | str:
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == code, (r.exit_code, r.output)
    if "--json" in args and code == 0:
        return json.loads(r.stdout)
    return r.output


def load(repo: Path) -> Repository:
    return Repository.load(lambda n: (repo / "metadata" / n).read_bytes() if (repo / "metadata" / n).exists() else None)


def test_release_engineer_from_nothing_to_a_rotated_root(tmp_path):
    keys, repo, offline = tmp_path / "keys", tmp_path / "repo", tmp_path / "offline"
    out = abflip("repo", "init", "--keys", keys, "--to", repo, "--threshold", "root=2", "--keys-per-role", "root=3",
                 "--threshold", "targets=1", "--expiry", "timestamp=2", "--json")
    assert out["files"] == ["1.root.json", "1.targets.json", "1.snapshot.json", "timestamp.json"]
    assert sorted(p.name for p in keys.glob("*.pem")) == ["root-1.pem", "root-2.pem", "root-3.pem", "snapshot.pem",
                                                          "targets.pem", "timestamp.pem"]
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in keys.glob("*.pem"))
    assert json.loads((keys / "keys.json").read_text())["expiry_days"]["timestamp"] == 2

    st = abflip("repo", "status", "--repo", repo, "--json")
    root = next(r for r in st["roles"] if r["role"] == "root")
    assert (root["threshold"], len(root["keyids"]), len(root["signed"]), root["verified"]) == (2, 3, 3, True)

    # two root key holders take their keys offline; this machine keeps root-1
    offline.mkdir()
    for n in (2, 3):
        shutil.move(keys / f"root-{n}.pem", offline / f"root-{n}.pem")
    kids = {k["uri"]: k["keyid"] for k in json.loads((keys / "keys.json").read_text())["roles"]["root"]}
    # rotate: one new root key in, root-3 revoked
    abflip("repo", "rotate", "root", "--keys", keys, "--to", repo, "--generate", "1", "--revoke", kids["file2:root-3.pem"][:10])
    staged = keys / "staged" / "2.root.json"
    assert staged.exists()
    out = abflip("repo", "commit", "--keys", keys, "--to", repo, code=2)
    assert "role root v2 needs 1 more from the previous root (threshold 2" in out
    assert kids["file2:root-2.pem"] in out
    st = abflip("repo", "status", "--repo", repo, "--keys", keys, "--json")
    assert st["staged"][0]["role"] == "root" and not st["staged"][0]["verified"]
    # the holder of root-2 signs on their machine (only the staged file travels)
    out = abflip("repo", "sign", staged, "--key", offline / "root-2.pem")
    assert "signed" in out and "BEGIN" not in out
    abflip("repo", "commit", "--keys", keys, "--to", repo)
    assert not staged.exists()
    r = load(repo)
    assert r.root.signed.version == 2 and kids["file2:root-3.pem"] not in r.root.signed.roles["root"].keyids
    assert "root" in abflip("repo", "status", "--repo", repo)

    # a CI key for one product
    abflip("repo", "delegate", "edge-os", "--keys", keys, "--to", repo, "--generate")
    abflip("repo", "commit", "--keys", keys, "--to", repo)
    r = load(repo)
    assert "edge-os" in r.targets.signed.delegations.roles and (keys / "edge-os.pem").exists()

    # the scheduled refresh
    ts = r.timestamp.signed.version
    out = abflip("repo", "refresh", "--repo", repo, "--keys", keys, "--json")
    assert out["signed"] == []  # fresh: nothing due
    out = abflip("repo", "refresh", "--repo", repo, "--keys", keys, "--force", "--json")
    assert out["signed"] == ["timestamp.json"] and load(repo).timestamp.signed.version == ts + 1


def test_status_over_http(tmp_path):
    from abflip.httpserver import Server

    abflip("repo", "init", "--keys", tmp_path / "k", "--to", tmp_path / "r")
    with Server(tmp_path / "r") as srv:
        st = abflip("repo", "status", "--repo", srv.url, "--json")
    assert [r["role"] for r in st["roles"]] == ["root", "targets", "snapshot", "timestamp"]


def test_bad_threshold_option_is_a_user_error(tmp_path):
    out = abflip("repo", "init", "--keys", tmp_path / "k", "--to", tmp_path / "r", "--threshold", "root", code=2)
    assert "ROLE=N" in out


# -- the conformance client -------------------------------------------------------------------
def test_console_script_is_declared():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["abflip-tuf-client"] == "applier.conformance:main"


def client(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*CLIENT, *map(str, args)], capture_output=True, text=True, timeout=60, cwd=ROOT)


class _Count(RepoHandler):
    hits: list[str] = []

    def do_GET(self, head=False):
        _Count.hits.append(self.path)
        return RepoHandler.do_GET(self, head)


def test_conformance_client_init_refresh_download(world, tmp_path):
    world.publish("1.0.0")
    md, td = tmp_path / "md", tmp_path / "td"
    r = client("--metadata-dir", md, "init", world.repo / "metadata" / "1.root.json")
    assert r.returncode == 0, r.stderr
    r = client("--metadata-dir", md, "--metadata-url", f"{world.url}/metadata", "refresh")
    assert r.returncode == 0, r.stderr
    assert {"root.json", "timestamp.json", "snapshot.json", "targets.json"} <= {p.name for p in md.iterdir()}

    names = ["demo-os/channels/stable.json", "demo-os/releases/1.0.0/release.json"]
    args = ["--metadata-dir", md, "--metadata-url", f"{world.url}/metadata", "--target-base-url", f"{world.url}/targets",
            "--target-dir", td, *[a for n in names for a in ("--target-name", n)], "download"]
    _Count.hits = []
    world.handler = _Count
    r = client(*args)
    assert r.returncode == 0, r.stderr
    got = td / "demo-os%2Freleases%2F1.0.0%2Frelease.json"
    assert got.read_bytes() == (world.built["1.0.0"] / "release.json").read_bytes()
    assert len([h for h in _Count.hits if h.startswith("/targets/")]) == 2
    _Count.hits = []
    assert client(*args).returncode == 0
    assert [h for h in _Count.hits if h.startswith("/targets/")] == []  # already there and valid: not fetched again


def test_conformance_client_fails_on_first_bad_target(world, tmp_path):
    world.publish("1.0.0")
    md, td = tmp_path / "md", tmp_path / "td"
    assert client("--metadata-dir", md, "init", world.repo / "metadata" / "1.root.json").returncode == 0
    obj = world.object("demo-os/channels/stable.json")
    obj.write_bytes(obj.read_bytes() + b" ")  # tampered
    r = client("--metadata-dir", md, "--metadata-url", f"{world.url}/metadata", "--target-base-url",
               f"{world.url}/targets", "--target-dir", td, "--target-name", "demo-os/channels/stable.json",
               "--target-name", "demo-os/releases/1.0.0/release.json", "download")
    assert r.returncode == 1 and "stable.json" in r.stderr
    assert not any(td.iterdir())  # stopped at the first failure; no partial file left
    r = client("--metadata-dir", md, "--metadata-url", f"{world.url}/metadata", "--target-base-url",
               f"{world.url}/targets", "--target-dir", td, "--target-name", "nope/x", "download")
    assert r.returncode == 1
    assert client("--metadata-dir", md, "refresh").returncode == 1  # no --metadata-url
    assert client("--metadata-dir", md, "--bogus", "refresh").returncode == 1  # usage errors are failures too


def test_conformance_client_refuses_untrusted_metadata(world, tmp_path):
    world.publish("1.0.0")
    md = tmp_path / "md"
    other = tmp_path / "other-root.json"
    from metadata.repository import init_repository

    other.write_bytes(init_repository(tmp_path / "other-keys")[0].data)  # a root this repository is not signed by
    assert client("--metadata-dir", md, "init", other).returncode == 0
    r = client("--metadata-dir", md, "--metadata-url", f"{world.url}/metadata", "refresh")
    assert r.returncode == 1 and "timestamp" in r.stderr


def test_refresh_workflow_runs_the_refresh(tmp_path):
    """ci/refresh-workflow.yml's refresh step, run as written against a directory repository."""
    import yaml

    wf = yaml.safe_load((ROOT / "ci" / "refresh-workflow.yml").read_text())
    steps = {s.get("name"): s for s in wf["jobs"]["refresh"]["steps"]}
    script = steps["refresh"]["run"].replace("${{ github.event.inputs.force }}", "true")
    abflip("repo", "init", "--keys", tmp_path / "keys", "--to", tmp_path / "repo")
    shim = tmp_path / "bin" / "abflip"
    shim.parent.mkdir()
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m abflip.cli \"$@\"\n")
    shim.chmod(0o755)
    env = {"PATH": f"{shim.parent}:/usr/bin:/bin", "ABFLIP_REPO": str(tmp_path / "repo"),
           "ABFLIP_KEYS": str(tmp_path / "keys"), "PYTHONPATH": str(ROOT)}
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], env=env, capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "re-signed timestamp.json" in r.stdout
    assert load(tmp_path / "repo").timestamp.signed.version == 2
    assert wf.get("on", wf.get(True))["schedule"][0]["cron"]  # YAML 1.1 reads a bare "on" as true


def test_status_text_names_roles_and_staged_needs(tmp_path):
    keys, repo = tmp_path / "k", tmp_path / "r"
    abflip("repo", "init", "--keys", keys, "--to", repo, "--threshold", "targets=2")
    (keys / "targets-2.pem").unlink()  # that holder is elsewhere
    abflip("repo", "delegate", "edge-os", "--keys", keys, "--to", repo, "--generate")
    out = abflip("repo", "status", "--repo", repo, "--keys", keys)
    assert "targets" in out and "timestamp" in out
    assert "role targets v2 needs 1 more signature(s) (has 1 of 2)" in out


def test_refresh_racing_a_publish_never_hides_it(world):
    """A refresh that signed its timestamp before a publish landed must not put back a
    timestamp naming the older snapshot (it is compare-and-swapped, then settled)."""
    from abflip.commands.repo import _sign_and_write

    world.publish("1.0.0")
    raced = []

    def make(repo):
        files = repo.refresh_files(world.keys, force=True)
        if not raced:
            raced.append(world.publish("2.0.0"))  # lands between our read and our write
        return files

    _sign_and_write(str(world.repo), (None, None, None), world.keys, make)
    r = load(world.repo)
    assert r.timestamp.signed.snapshot_meta.version == r.snapshot.signed.version
    assert "demo-os/releases/2.0.0/release.json" in r.target_files
    sim, dev = world.device()
    assert dev.install().version == "2.0.0"
