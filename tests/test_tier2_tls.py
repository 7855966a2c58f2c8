"""TLS and the shared token between tier 1 and a real tier-2 server process on loopback: a client that
trusts the server's self-signed certificate and sends the token handshakes and attends; plaintext, an
untrusted certificate or a missing token are refused; config.tier2.tls_ca/auth_token reach the client."""

import datetime
import ipaddress

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from configs import tiny
from glinthawk_jax.config import ConfigError, model_config, validate
from glinthawk_jax.tier2_client import ShardUnavailableError, Tier2Client, Tier2Error
from glinthawk_jax.tier2_launch import Tier2Servers, server_args
from tier2_cpu import server
from tier2_cpu.process import start_servers, stop_servers

TOKEN = "tls-test-token"


def _self_signed(directory, name):
  """A self-signed certificate for 127.0.0.1 and localhost: (cert path, key path)."""
  key = ec.generate_private_key(ec.SECP256R1())
  subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
  now = datetime.datetime.now(datetime.timezone.utc)
  cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
          .public_key(key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                      x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                         critical=False)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(key, hashes.SHA256()))
  cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
  cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
  key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
  return str(cert_path), str(key_path)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
  directory = tmp_path_factory.mktemp("tls")
  cert, key = _self_signed(directory, "tier2")
  other_ca, _ = _self_signed(directory, "stranger")
  config = tiny.get_config()
  args = server_args(config, model_config(config), "") + [
      f"--tls_cert={cert}", f"--tls_key={key}", f"--auth_token={TOKEN}"]
  procs = start_servers([args])
  yield procs[0].address, cert, other_ca
  stop_servers(procs)


def _client(address, **kwargs):
  return Tier2Client.for_model([address], model_config(tiny.get_config()), timeout_s=10, **kwargs)


def test_tls_client_with_the_token_attends(tls_server):
  address, cert, _ = tls_server
  rng = np.random.default_rng(0)
  with _client(address, tls_ca=cert, auth_token=TOKEN, transport="grpc") as client:
    client.allocate([7])
    q, k, v = (rng.standard_normal((1, h, 16)).astype(np.float32) for h in (4, 2, 2))
    out = client.attend(0, [7], [0], q, k, v)
    # One key: attention returns its value, repeated over the query heads of each KV head (GQA 4/2).
    np.testing.assert_allclose(out, np.repeat(v, 2, axis=1), rtol=1e-6)
    client.release([7])


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(auth_token=TOKEN), ShardUnavailableError, None),  # plaintext to a TLS port
    (dict(tls_ca="stranger", auth_token=TOKEN), ShardUnavailableError, None),  # certificate not trusted
    (dict(tls_ca="cert"), Tier2Error, "UNAUTHENTICATED"),  # TLS without the token
])
def test_refused_without_trust_or_token(tls_server, kwargs, error, message):
  address, cert, stranger = tls_server
  kwargs = {k: {"cert": cert, "stranger": stranger}.get(v, v) for k, v in kwargs.items()}
  with pytest.raises(error, match=message):
    _client(address, transport="grpc", **kwargs)


def test_config_keys_reach_the_client(tls_server):
  address, cert, _ = tls_server
  config = tiny.get_config()
  config.tier2.update(addresses=address, tls_ca=cert, auth_token=TOKEN)
  validate(config)
  servers = Tier2Servers(config, model_config(config))
  try:
    assert servers.processes == [] and servers.client.stats()[0]["address"] == address
  finally:
    servers.close()


def test_bad_tls_settings_are_named(tmp_path):
  config = tiny.get_config()
  config.tier2.tls_ca = str(tmp_path / "missing.pem")
  with pytest.raises(ConfigError, match="tier2.tls_ca is set but tier2.addresses is empty"):
    validate(config)
  config.tier2.addresses = "cpu-node-1:50051"
  with pytest.raises(ConfigError, match="tier2.tls_ca='.*missing.pem': no such file"):
    validate(config)
  options = server.ServerOptions(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                                 kv_cache_gb=0.001, tls_cert=str(tmp_path / "a.crt"))
  with pytest.raises(ValueError, match="tls_cert and tls_key: set both"):
    server.build_server(options)
