"""Throwaway TLS material, made with the ``openssl`` command line."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TLSFiles", "tls_files"]

# The extensions Python's strict verification (VERIFY_X509_STRICT, on by default from 3.13)
# asks for: key identifiers, key usage, a critical basicConstraints on the CAs.
_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""

_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class TLSFiles:
    """PEM files for a TLS test: a CA, a server and a client it signed, and an unrelated CA.

    The server certificate names ``127.0.0.1`` and ``localhost``; everything is valid for a
    day. ``other_ca_cert`` signed nothing here, so a client trusting only it must be refused.
    """

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_cert: Path

    def client_kwargs(self, *, client_cert: bool = True) -> dict[str, str]:
        """redis-py's ``ssl_*`` arguments for a client trusting this CA.

        ``Redis.from_url(server.url, **files.client_kwargs())``
        """
        kwargs = {"ssl_ca_certs": str(self.ca_cert)}
        if client_cert:
            kwargs |= {"ssl_certfile": str(self.client_cert), "ssl_keyfile": str(self.client_key)}
        return kwargs


def tls_files(directory: str | os.PathLike[str]) -> TLSFiles:
    """Make a fresh CA, server and client certificates (and another CA) in ``directory``."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise FileNotFoundError("TLS test certificates need openssl: `apt-get install openssl`")
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "openssl.cnf"
    config.write_text(_CONFIG)

    def run(*args: str | Path) -> None:
        done = subprocess.run(
            [openssl, *map(str, args)], capture_output=True, text=True, timeout=60
        )
        if done.returncode:
            raise RuntimeError(f"openssl {args[0]} failed: {done.stderr.strip()}")

    def make_ca(name: str, subject: str) -> tuple[Path, Path]:
        cert, key = folder / f"{name}.crt", folder / f"{name}.key"
        run("req", "-x509", "-new", *_KEY, "-keyout", key, "-out", cert, "-days", "1",
            "-subj", subject, "-config", config, "-extensions", "ca")  # fmt: skip
        return cert, key

    def make_leaf(name: str, subject: str, ca: tuple[Path, Path]) -> tuple[Path, Path]:
        cert, key, request = (folder / f"{name}.{ext}" for ext in ("crt", "key", "csr"))
        run("req", "-new", *_KEY, "-keyout", key, "-out", request, "-subj", subject,
            "-config", config)  # fmt: skip
        run("x509", "-req", "-in", request, "-CA", ca[0], "-CAkey", ca[1], "-set_serial",
            str(int.from_bytes(os.urandom(8), "big")), "-days", "1", "-out", cert,
            "-extfile", config, "-extensions", name)  # fmt: skip
        request.unlink()
        return cert, key

    ca = make_ca("ca", "/CN=celery-unique test CA")
    server = make_leaf("server", "/CN=localhost", ca)
    client = make_leaf("client", "/CN=celery-unique test client", ca)
    other_cert, _other_key = make_ca("other_ca", "/CN=celery-unique unrelated CA")
    return TLSFiles(
        ca_cert=ca[0],
        ca_key=ca[1],
        server_cert=server[0],
        server_key=server[1],
        client_cert=client[0],
        client_key=client[1],
        other_ca_cert=other_cert,
    )
