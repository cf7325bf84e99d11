"""The private CA and server certificate of the local TLS listeners."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
)

from twinflow.services.tls import (
    RENEW_BEFORE,
    SERVER_DAYS,
    TlsFiles,
    certificate_names,
    ensure_certificates,
    issued_by,
    new_ca,
    new_server_certificate,
    tls_files,
)

NOW = dt.datetime.now(dt.UTC)


def _chain(files: TlsFiles) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(files.chain.read_bytes())


def _contents(files: TlsFiles) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in files.directory.iterdir()}


@pytest.fixture
def files(tmp_path: Path) -> TlsFiles:
    return tls_files(tmp_path / "state")


def test_first_call_writes_a_private_ca_and_a_server_chain(files: TlsFiles) -> None:
    assert ensure_certificates(files, now=NOW)
    assert files.directory.stat().st_mode & 0o777 == 0o700
    assert sorted(_contents(files)) == ["ca.key", "ca.pem", "server.key", "server.pem"]
    for path in files.directory.iterdir():
        assert path.stat().st_mode & 0o777 == 0o600, path
    leaf, ca = _chain(files)
    assert ca.public_bytes(Encoding.PEM) == files.ca.read_bytes()
    assert issued_by(leaf, ca)
    assert certificate_names(leaf) == ("localhost", "127.0.0.1")
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert leaf.not_valid_after_utc - NOW > dt.timedelta(days=SERVER_DAYS - 1)
    assert b"BEGIN PRIVATE KEY" in files.key.read_bytes()  # PKCS#8, as Kafka's PEM store wants


def test_valid_files_are_reused_untouched(files: TlsFiles) -> None:
    ensure_certificates(files, now=NOW)
    before = _contents(files)
    assert not ensure_certificates(files, now=NOW + dt.timedelta(days=100))
    assert _contents(files) == before


def test_other_names_get_a_new_server_certificate_from_the_same_ca(files: TlsFiles) -> None:
    ensure_certificates(files, now=NOW)
    before = _contents(files)
    assert ensure_certificates(files, ["broker.example"], now=NOW)
    after = _contents(files)
    assert after["ca.pem"] == before["ca.pem"] and after["ca.key"] == before["ca.key"]
    assert after["server.key"] != before["server.key"]
    leaf, ca = _chain(files)
    assert certificate_names(leaf) == ("broker.example",)
    assert issued_by(leaf, ca)


def test_a_server_certificate_near_its_end_is_renewed(files: TlsFiles) -> None:
    ensure_certificates(files, now=NOW)
    ca_before = files.ca.read_bytes()
    (old_leaf, _) = _chain(files)
    late = old_leaf.not_valid_after_utc - RENEW_BEFORE + dt.timedelta(hours=1)
    assert ensure_certificates(files, now=late)
    (new_leaf, _) = _chain(files)
    assert new_leaf.serial_number != old_leaf.serial_number
    assert new_leaf.not_valid_after_utc > old_leaf.not_valid_after_utc
    assert files.ca.read_bytes() == ca_before


@pytest.mark.parametrize("damage", ["ca.key", "ca.pem", "server.key", "server.pem"])
def test_a_damaged_file_is_replaced(files: TlsFiles, damage: str) -> None:
    ensure_certificates(files, now=NOW)
    (files.directory / damage).write_text("not PEM")
    assert ensure_certificates(files, now=NOW)
    leaf, ca = _chain(files)
    assert issued_by(leaf, ca)
    assert not ensure_certificates(files, now=NOW)


def test_a_server_certificate_from_another_ca_is_replaced(files: TlsFiles) -> None:
    ensure_certificates(files, now=NOW)
    ca = _chain(files)[1]
    other_key, other_ca = new_ca(NOW)
    key, foreign = new_server_certificate(other_key, other_ca, ["localhost", "127.0.0.1"], NOW)
    assert issued_by(foreign, other_ca) and not issued_by(foreign, ca)
    files.chain.write_bytes(foreign.public_bytes(Encoding.PEM) + ca.public_bytes(Encoding.PEM))
    files.key.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    assert ensure_certificates(files, now=NOW)
    leaf, chained_ca = _chain(files)
    assert chained_ca == ca and issued_by(leaf, ca)


def test_new_server_certificate_needs_a_name() -> None:
    key, ca = new_ca(NOW)
    with pytest.raises(ValueError, match="at least one name"):
        new_server_certificate(key, ca, [], NOW)


def _handshake(files: TlsFiles, ca_file: Path, server_hostname: str) -> None:
    """A real TLS handshake: a server with the chain, a strict client trusting ``ca_file``."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(files.chain, files.key)
    client_context = ssl.create_default_context(cafile=str(ca_file))
    client_context.verify_flags |= ssl.VERIFY_X509_STRICT
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            connection, _ = listener.accept()
            try:
                with server_context.wrap_socket(connection, server_side=True) as tls:
                    tls.recv(1)
            except (ssl.SSLError, OSError):
                pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
                client_context.wrap_socket(raw, server_hostname=server_hostname) as tls,
            ):
                tls.sendall(b"x")
        finally:
            thread.join(5)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_a_strict_client_trusting_the_ca_accepts_the_server(files: TlsFiles, host: str) -> None:
    ensure_certificates(files, now=NOW)
    _handshake(files, files.ca, host)


def test_a_client_trusting_another_ca_refuses_the_server(files: TlsFiles, tmp_path: Path) -> None:
    ensure_certificates(files, now=NOW)
    other = tls_files(tmp_path / "other")
    ensure_certificates(other, now=NOW)
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        _handshake(files, other.ca, "127.0.0.1")


@pytest.mark.parametrize(
    ("host", "code", "words"),
    [("127.0.0.1", 64, "IP address mismatch"), ("localhost", 62, "Hostname mismatch")],
)
def test_a_name_outside_the_certificate_is_refused(
    files: TlsFiles, host: str, code: int, words: str
) -> None:
    ensure_certificates(files, ["broker.example"], now=NOW)
    with pytest.raises(ssl.SSLCertVerificationError, match=words) as caught:
        _handshake(files, files.ca, host)
    assert caught.value.verify_code == code  # what connectors.mqtt.tls_refusal keys on
