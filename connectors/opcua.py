"""OPC UA certificates: what the server and the bridge both read from them."""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding


def certificate_der(path: Path) -> bytes:
    """The certificate in ``path`` (PEM or DER) as DER bytes."""
    data = path.read_bytes()
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(data).public_bytes(Encoding.DER)
    return data


def certificate_uri(der: bytes) -> str | None:
    """The ApplicationUri a certificate carries (its first SAN URI), if any.

    OPC UA peers check that the ApplicationUri an application reports is the one in
    its certificate, so both ends take it from there rather than inventing one.
    """
    certificate = x509.load_der_x509_certificate(der)
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    uris = names.value.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


def fingerprint(der: bytes) -> str:
    """SHA-256 of a DER certificate, as shown in pinning errors."""
    return hashlib.sha256(der).hexdigest()
