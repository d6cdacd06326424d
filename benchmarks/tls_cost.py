"""What TLS costs per message on this machine, cipher by cipher, in one process.

``python -m benchmarks.tls_cost [--count N] [--batch N] [--size BYTES]``

A client and a server TLS object over memory BIOs, the way asyncio's and uvloop's TLS
layers run them: the client encrypts a batch of messages written at once (as a connection
writes one loop iteration's frames), the server decrypts it into a lent buffer (as
``protocol.tlsreads`` has it). It prints the CPU per message of each side for TLS 1.3 with
the suite OpenSSL picks by default, then for each AEAD cipher under TLS 1.2 (Python's
``ssl`` module can choose TLS 1.2 ciphers but not TLS 1.3 suites; a record's cipher work
is the same). Handshakes are not counted. The figures are what one message costs its
sender and its receiver for TLS alone; a message through the broker pays both twice (the
producer's connection, then the consumer's).
"""

from __future__ import annotations

import argparse
import os
import ssl
import tempfile
import time
from typing import cast

__all__ = ["tls_cost_main", "measure"]

#: (label, TLS 1.2 cipher string or None for TLS 1.3's default suite)
CIPHERS = (
    ("TLS 1.3, default suite", None),
    ("TLS 1.2, AES-256-GCM", "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384"),
    ("TLS 1.2, AES-128-GCM", "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256"),
    ("TLS 1.2, ChaCha20-Poly1305", "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"),
)


def _contexts(folder: str, cipher: str | None) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert_file, key_file, ca_file = (os.path.join(folder, n) for n in ("cert.pem", "key.pem", "ca.pem"))
    cert.cert_chain_pems[0].write_to_path(cert_file)
    cert.private_key_pem.write_to_path(key_file)
    ca.cert_pem.write_to_path(ca_file)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_file, key_file)
    client = ssl.create_default_context(cafile=ca_file)
    if cipher is not None:
        for ctx in (server, client):
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
            ctx.set_ciphers(cipher)
    return server, client


def measure(cipher: str | None, count: int, batch: int, size: int) -> tuple[str, float, float]:
    """The negotiated cipher and the CPU ns per message to encrypt and to decrypt."""
    with tempfile.TemporaryDirectory(prefix="halfmq-tls-cost-") as folder:
        server_ctx, client_ctx = _contexts(folder, cipher)
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    for _ in range(10):  # the handshake, both ways until done
        for side in (client, server):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    data = os.urandom(size) * batch
    buf = memoryview(bytearray(256 * 1024))
    rounds = max(1, count // batch)
    enc = dec = 0.0
    clock = time.thread_time
    for _ in range(rounds):
        t0 = clock()
        client.write(data)
        wire = c_out.read()
        t1 = clock()
        s_in.write(wire)
        got = 0
        while got < len(data):
            got += cast(int, server.read(len(buf), buf))  # (with a buffer: the count)
        t2 = clock()
        enc += t1 - t0
        dec += t2 - t1
    n = rounds * batch
    name = server.cipher()
    return (name[0] if name else "?"), enc / n * 1e9, dec / n * 1e9


def tls_cost_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tls_cost", description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=200_000, help="messages per cipher (default 200,000)")
    ap.add_argument("--batch", type=int, default=32, help="messages written at once (default 32)")
    ap.add_argument("--size", type=int, default=1100, help="bytes of one message on the wire (default 1,100)")
    args = ap.parse_args(argv)
    if args.count <= 0 or args.batch <= 0 or args.size <= 0:
        ap.error("--count, --batch and --size must be positive")
    print(f"TLS alone, CPU ns per message of {args.size:,} bytes written {args.batch} at a time "
          f"({ssl.OPENSSL_VERSION}; {args.count:,} messages per cipher)")
    print(f"{'cipher':30} {'negotiated':32} {'encrypt':>8} {'decrypt':>8}", flush=True)
    for label, cipher in CIPHERS:
        name, enc, dec = measure(cipher, args.count, args.batch, args.size)
        print(f"{label:30} {name:32} {enc:8,.0f} {dec:8,.0f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(tls_cost_main())
