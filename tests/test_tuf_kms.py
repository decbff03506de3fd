"""An online role signed through AWS KMS (securesystemslib's AWSSigner, ``awskms:`` URI,
ECDSA P-256), against moto's KMS server on 127.0.0.1 with dummy credentials.

moto 5.2 does not implement ``MessageType=DIGEST`` (moto/kms/models.py says so): it hashes
the message it is given, so a signature over the digest AWSSigner sends would be over
sha256(sha256(payload)). The fixture makes moto's ECDSA key treat the message as the
prehashed digest, as real KMS does for DIGEST; everything else (endpoint, GetPublicKey,
Sign over HTTP, the URI in keys.json) is the real path.
"""

from __future__ import annotations

import socket

import pytest

pytest.importorskip("moto")
pytest.importorskip("boto3")

from cryptography.hazmat.primitives.asymmetric import ec, utils
from moto.kms import utils as moto_kms
from moto.server import ThreadedMotoServer

from builder.publish import write_signed
from metadata.keys import KeyConfig, public_key_from
from metadata.repository import Repository
from metadata.staging import clear_staged, commit_staged, stage_rotation


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def kms(monkeypatch):
    def sign_digest(self, message, signing_algorithm):
        moto_kms.validate_signing_algorithm(signing_algorithm, self.valid_signing_algorithms)
        return self.private_key.sign(message, ec.ECDSA(utils.Prehashed(self._ECDSAPrivateKey__hash_algorithm(signing_algorithm))))

    monkeypatch.setattr(moto_kms.ECDSAPrivateKey, "sign", sign_digest)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for k, v in {"AWS_ENDPOINT_URL_KMS": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                 "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    import boto3

    client = boto3.client("kms")
    try:
        yield client
    finally:
        server.stop()


def new_key(client) -> str:
    meta = client.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY", Description="abflip timestamp")
    return meta["KeyMetadata"]["KeyId"]


def test_timestamp_signed_by_kms_is_verified_by_the_device(world, kms):
    world.publish("1.0.0")
    sim, dev = world.device()
    key, uri = public_key_from(f"awskms:{new_key(kms)}")
    assert uri.startswith("awskms:") and key.scheme == "ecdsa-sha2-nistp256"
    load = lambda: Repository.load(lambda n: world.storage.get(f"metadata/{n}"))
    old = world.keys.roles["timestamp"][0].keyid
    stage_rotation(load(), world.keys, "timestamp", add=[(key, uri)], revoke=[old])
    write_signed(world.storage, commit_staged(load(), world.keys))
    clear_staged(world.keys.dir)
    assert KeyConfig.load(world.keys.dir).roles["timestamp"][0].uri == uri  # keys.json holds the URI only
    ts = load().timestamp
    assert list(ts.signatures) == [key.keyid]

    world.publish("2.0.0")  # timestamp signed through KMS
    assert dev.install().version == "2.0.0"

    files = load().refresh_files(KeyConfig.load(world.keys.dir), force=True)
    assert [f.name for f in files] == ["timestamp.json"]
    write_signed(world.storage, files)
    assert load().verification("timestamp").verified


def test_init_with_a_kms_key_from_the_cli(tmp_path, kms):
    from typer.testing import CliRunner

    from abflip.cli import app

    kid = new_key(kms)
    r = CliRunner().invoke(app, ["repo", "init", "--keys", str(tmp_path / "k"), "--to", str(tmp_path / "r"),
                                 "--key", f"snapshot=awskms:{kid}", "--key", f"timestamp=awskms:{kid}"])
    assert r.exit_code == 0, r.output
    repo = Repository.load(lambda n: (tmp_path / "r/metadata" / n).read_bytes()
                           if (tmp_path / "r/metadata" / n).exists() else None)
    assert repo.verification("snapshot").verified and repo.verification("timestamp").verified
    assert not (tmp_path / "k" / "timestamp.pem").exists()


def test_unreachable_kms_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", f"http://127.0.0.1:{_free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    from metadata.errors import UserError

    with pytest.raises(UserError, match="cannot load signing key awskms:nope"):
        public_key_from("awskms:nope")
