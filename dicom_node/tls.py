"""TLS contexts for DICOM over TLS (PS3.15 B.1, the BCP 195 profile's floor: TLS 1.2 or later).

The node's SCP wraps every accepted connection with `server_context`; a destination with a
`tls` table connects through `client_context`. Both come from config.TlsSettings, whose files
the config loader has already found; a file that is not a valid PEM certificate or key fails
here with a NodeError naming it.
"""
from __future__ import annotations

import ssl

from dicom_node.config import TlsSettings
from dicom_node.errors import ConfigError


def _load(context: ssl.SSLContext, tls: TlsSettings, where: str) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if tls.ca is not None:
            context.load_verify_locations(cafile=str(tls.ca))
        if tls.cert is not None:
            context.load_cert_chain(str(tls.cert), str(tls.key))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{where}: cannot load the certificate, key or CA: {exc}") from None
    return context


class _ServerContext(ssl.SSLContext):
    """pynetdicom wraps each accepted socket in its accept loop: with the handshake done there, a
    connection that never sends a ClientHello (a port probe) would stop every other association.
    Here the handshake is left to the connection's own thread (OpenSSL does it on the first
    read), where the association's ARTIM timer (acse_timeout) ends a silent connection."""

    def wrap_socket(self, sock, *args, **kwargs):
        kwargs["do_handshake_on_connect"] = False
        return super().wrap_socket(sock, *args, **kwargs)


def server_context(tls: TlsSettings) -> ssl.SSLContext:
    """The node's side: its certificate; clients verified against `ca` (required with
    require_client_cert, checked when presented otherwise)."""
    context = _ServerContext(ssl.PROTOCOL_TLS_SERVER)
    _load(context, tls, "[node.tls]")
    if tls.require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
    elif tls.ca is not None:
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def client_context(tls: TlsSettings, destination: str) -> ssl.SSLContext:
    """A destination's side: the PACS's certificate verified (against `ca`, or the system's
    CAs) and its name checked; our client certificate when configured."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    if not tls.verify:
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    elif tls.ca is None:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    return _load(context, tls, f"destination {destination!r} tls")
