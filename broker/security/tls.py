"""TLS contexts for the native and HTTP ports (``--tls-cert``, ``--tls-key``,
``--tls-client-ca``) and for clients.

How this works
--------------
``server_context`` loads the broker's certificate chain and key; with a client CA, every
client must present a certificate signed by it (mutual TLS: a client without one is cut
off during the TLS handshake, before it can send a frame). TLS 1.2 is the minimum.
``client_context`` is what the SDKs and the CLI build from ``tls=True`` (the system's
trusted CAs), a CA file, and optionally a client certificate for mutual TLS.
"""

from __future__ import annotations

import ssl

__all__ = ["server_context", "client_context"]


def server_context(cert: str, key: str | None = None, client_ca: str | None = None) -> ssl.SSLContext:
    """A server context for ``cert`` (PEM chain) and ``key`` (PEM; None: in ``cert``).

    With ``client_ca`` (PEM), clients must present a certificate it signed. Raises
    ``OSError``/``ssl.SSLError`` if a file cannot be read or does not fit.
    """
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if client_ca:
        ctx.load_verify_locations(cafile=client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(*, ca: str | None = None, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """A client context that checks the broker's certificate and host name against ``ca``
    (a PEM file; None: the system's trusted CAs), presenting ``cert``/``key`` if given."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx
