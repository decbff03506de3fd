"""A real S3 server for the tests: moto's server (``python -m moto.server``) on 127.0.0.1, spoken to over HTTP by boto3.

Nothing is patched in-process: the publisher uses boto3 against the server's endpoint, and
devices fetch the public objects at ``http://127.0.0.1:PORT/<bucket>/<key>`` with their own
HTTP client, as they would from S3 or a CDN.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest

from abflip.demo import HARDWARE, PRODUCT
from abflip.sim import SimDevice
from applier.agent import Device
from builder.publish import publish_release, write_signed
from metadata.keys import KeyConfig
from metadata.repository import init_repository

DUMMY_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
             "AWS_SESSION_TOKEN": "", "AWS_SECURITY_TOKEN": ""}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        # moto's server module with this interpreter: no ``moto_server`` on PATH needed (a new
        # shell runs the README's test line without activating the venv)
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env=dict(os.environ, **(env or {})))
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("moto_server did not start (pip install 'moto[server]')")
                time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def new_bucket(self, *, public: bool = True) -> str:
        name = f"repo-{uuid.uuid4().hex[:12]}"
        c = self.client()
        c.create_bucket(Bucket=name)
        if public:  # devices read anonymously, as from a public bucket or a CDN in front of it
            c.put_bucket_policy(Bucket=name, Policy=json.dumps({"Version": "2012-10-17", "Statement": [
                {"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{name}/*"}]}))
        return name


@pytest.fixture(scope="session")
def moto():
    saved = {k: os.environ.get(k) for k in DUMMY_ENV}
    os.environ.update(DUMMY_ENV)
    server = MotoServer()
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


class S3World:
    """Like conftest's World, with the repository in a bucket on the moto server."""

    def __init__(self, tmp: Path, built: dict[str, Path], moto: MotoServer, prefix: str = "repo") -> None:
        from builder.storage.s3 import S3Storage

        self.tmp = tmp
        self.built = built
        self.moto = moto
        self.bucket = moto.new_bucket()
        self.s3_url = f"s3://{self.bucket}/{prefix}"
        self.storage = S3Storage.from_url(self.s3_url, endpoint_url=moto.endpoint, region="us-east-1")
        self.url = f"{moto.endpoint}/{self.bucket}/{prefix}"
        self.keys_dir = tmp / "keys"
        write_signed(self.storage, init_repository(self.keys_dir))
        self.keys = KeyConfig.load(self.keys_dir)

    def publish(self, version: str, *, channel: str = "stable", now: datetime | None = None):
        return publish_release(self.built[version], self.storage, self.keys, channel=channel, now=now)

    @property
    def root_json(self) -> bytes:
        data = self.storage.get("metadata/1.root.json")
        assert data is not None
        return data

    def device(self, name: str = "dev", *, channel: str = "stable", slot_size: int = 8 << 20,
               booted_version: str = "1.0.0") -> tuple[SimDevice, Device]:
        return make_device(self.tmp / name, self.url, self.root_json, self.built, channel=channel,
                           slot_size=slot_size, booted_version=booted_version)


def make_device(root: Path, url: str, trusted_root: bytes, built: dict[str, Path], *, channel: str = "stable",
                slot_size: int = 8 << 20, booted_version: str = "1.0.0") -> tuple[SimDevice, Device]:
    sim = SimDevice.create(root, repository_url=url, trusted_root=trusted_root, product=PRODUCT, hardware_id=HARDWARE,
                           slot_size=slot_size, channel=channel, retries=1, timeout=5.0)
    sim.provision(built[f"{booted_version}.img"], slot="a", version=booted_version, product=PRODUCT)
    dev = Device(sim.config)
    dev.mark_good()
    return sim, dev


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path, built):
    """A repository world on either backend: .storage, .url, .publish(), .device()."""
    if request.param == "local":
        return request.getfixturevalue("world")
    return S3World(tmp_path, built, request.getfixturevalue("moto"))
