"""A private CA and the server certificate of the local TLS listeners.

``twinflow up`` keeps them in ``STATE_DIR/tls`` (folder 0700, files 0600): ``ca.pem``
is what clients trust, ``server.pem`` holds the server certificate followed by the CA
(the chain Kafka, Mosquitto and uvicorn send), ``server.key`` its PKCS#8 key. They are
reused while they are valid for long enough and name the wanted hosts; a server
certificate that no longer fits is issued again by the same CA, so clients that trust
``ca.pem`` keep working.

Keys are EC P-256: every TLS stack twinflow talks to (OpenSSL in Mosquitto, librdkafka
and Python, the JDK in Kafka) accepts them, and they are made in milliseconds.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
SERVER_DAYS = 397
RENEW_BEFORE = dt.timedelta(days=30)
"""A certificate expiring sooner than this is replaced when ``twinflow up`` starts."""
DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1")
# Clock skew between this host and a client must not make a fresh certificate "not yet valid".
_BACKDATE = dt.timedelta(minutes=5)

Name = str
"""A DNS name or an IP address a server certificate is issued for."""


@dataclass(frozen=True)
class TlsFiles:
    """Where the CA and the server's certificate chain and key are."""

    directory: Path

    @property
    def ca(self) -> Path:
        """The CA certificate clients trust (PEM)."""
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        """The CA's private key: it signs server certificates, nothing else reads it."""
        return self.directory / "ca.key"

    @property
    def chain(self) -> Path:
        """The server certificate, then the CA (PEM)."""
        return self.directory / "server.pem"

    @property
    def key(self) -> Path:
        """The server certificate's private key (unencrypted PKCS#8 PEM)."""
        return self.directory / "server.key"


def tls_files(state_dir: Path) -> TlsFiles:
    """The TLS files of the local services in the private state folder.

    >>> tls_files(Path("/srv/.twinflow")).chain
    PosixPath('/srv/.twinflow/tls/server.pem')
    """
    return TlsFiles(state_dir / "tls")


def _general_name(name: Name) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _key_id(key: ec.EllipticCurvePrivateKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(key.public_key())


def new_ca(
    now: dt.datetime, common_name: str = "twinflow local CA"
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A fresh CA key and its self-signed certificate, valid from ``now`` for CA_DAYS.

    >>> key, ca = new_ca(dt.datetime(2030, 1, 1, tzinfo=dt.UTC))
    >>> ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    True
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(_key_id(key), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, certificate


def new_server_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate,
    names: Sequence[Name],
    now: dt.datetime,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A server key and its certificate for ``names`` (SAN), signed by ``ca``.

    >>> ca_key, ca = new_ca(dt.datetime(2030, 1, 1, tzinfo=dt.UTC))
    >>> _, cert = new_server_certificate(
    ...     ca_key, ca, ["localhost", "127.0.0.1"], dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    ... )
    >>> certificate_names(cert)
    ('localhost', '127.0.0.1')
    """
    if not names:
        raise ValueError("a server certificate needs at least one name or address")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    not_after = min(now + dt.timedelta(days=SERVER_DAYS), ca.not_valid_after_utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([_general_name(name) for name in names]), critical=False
        )
        .add_extension(_key_id(key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, certificate


def certificate_names(certificate: x509.Certificate) -> tuple[Name, ...]:
    """The DNS names and IP addresses of a certificate's SAN, in order, as text."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(str(name.value) for name in san)


def fresh(certificate: x509.Certificate, now: dt.datetime) -> bool:
    """Whether ``certificate`` is valid now and for at least RENEW_BEFORE more."""
    return (
        certificate.not_valid_before_utc <= now
        and now + RENEW_BEFORE < certificate.not_valid_after_utc
    )


def issued_by(certificate: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether ``ca`` signed ``certificate``."""
    try:
        certificate.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem(*certificates: x509.Certificate) -> bytes:
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certificates)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        os.fchmod(file.fileno(), 0o600)  # an existing file keeps its mode otherwise
        file.write(data)


def _load_ca(
    files: TlsFiles, now: dt.datetime
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None:
    try:
        ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
        key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
    except (OSError, ValueError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not fresh(ca, now):
        return None
    if key.public_key() != ca.public_key():
        return None
    return key, ca


def _server_fits(
    files: TlsFiles, ca: x509.Certificate, names: Sequence[Name], now: dt.datetime
) -> bool:
    try:
        chain = x509.load_pem_x509_certificates(files.chain.read_bytes())
        key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    except (OSError, ValueError):
        return False
    leaf = chain[0]
    return (
        chain[1:] == [ca]
        and key.public_key() == leaf.public_key()
        and issued_by(leaf, ca)
        and fresh(leaf, now)
        and certificate_names(leaf) == tuple(names)
    )


def ensure_certificates(
    files: TlsFiles,
    names: Sequence[Name] = DEFAULT_SERVER_NAMES,
    now: dt.datetime | None = None,
) -> bool:
    """Make the CA and a server certificate for ``names`` unless fitting ones exist.

    Returns whether anything was written. The folder is made private (0700) and every
    file is written 0600: the keys must not be readable by other local users.
    """
    now = now or dt.datetime.now(dt.UTC)
    files.directory.mkdir(parents=True, exist_ok=True)
    os.chmod(files.directory, 0o700)
    loaded = _load_ca(files, now)
    if loaded is not None and _server_fits(files, loaded[1], names, now):
        return False
    if loaded is None:
        ca_key, ca = new_ca(now)
        _write_private(files.ca_key, _pem_key(ca_key))
        _write_private(files.ca, _pem(ca))
    else:
        ca_key, ca = loaded
    key, certificate = new_server_certificate(ca_key, ca, names, now)
    _write_private(files.key, _pem_key(key))
    _write_private(files.chain, _pem(certificate, ca))
    return True


def local_certificates(
    state_dir: Path, names: Sequence[Name], progress: Callable[[str], None]
) -> TlsFiles:
    """The local services' TLS files in ``state_dir``, made or renewed as needed."""
    files = tls_files(state_dir)
    if ensure_certificates(files, names):
        progress(f"TLS: new server certificate for {', '.join(names)} in {files.directory}")
    return files
