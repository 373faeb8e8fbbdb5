"""Security options, off by default: TLS credentials (gRPC and HTTP) and the bearer token's file (the check
itself is serve/guard.py's, once for every door)."""

from __future__ import annotations

from pathlib import Path

from centra.errors import CentraError


def read_secret(path: Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise CentraError(f"{path}: file not found ({what})") from None
    except OSError as exc:
        raise CentraError(f"{path}: cannot read {what} ({exc.strerror})") from None
    if not data.strip():
        raise CentraError(f"{path}: empty file ({what})")
    return data


def read_token(path: Path) -> str:
    """The bearer token: one word of visible ASCII (what gRPC metadata can carry)."""
    raw = read_secret(path, "token file").strip()
    if not all(0x21 <= byte <= 0x7E for byte in raw):
        raise CentraError(f"{path}: the token must be one word of visible ASCII characters on one line")
    return raw.decode("ascii")


def check_tls(cert: Path, key: Path) -> None:
    """Refuse, before anything is loaded, a certificate and key that do not make a TLS server."""
    import ssl

    for path, what in ((cert, "TLS certificate"), (key, "TLS key")):
        read_secret(path, what)
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(cert), str(key))
    except ssl.SSLError as exc:
        raise CentraError(f"{cert}, {key}: not a PEM certificate chain and its private key ({exc.reason or exc})") \
            from None


def tls_credentials(cert: Path, key: Path):
    """Server credentials from a PEM certificate chain and its private key."""
    import grpc

    check_tls(cert, key)
    return grpc.ssl_server_credentials([(read_secret(key, "TLS key"), read_secret(cert, "TLS certificate"))])


def tls_context(cert: Path, key: Path):
    """An ssl.SSLContext serving the same certificate and key (HTTP)."""
    import ssl

    check_tls(cert, key)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))
    return context


def channel_credentials(ca: Path):
    """Client credentials that trust the PEM root certificate(s) in `ca`."""
    import grpc

    return grpc.ssl_channel_credentials(root_certificates=read_secret(ca, "TLS CA"))
