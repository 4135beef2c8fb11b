"""TLS and CORS for the router and the replica, with the flags vLLM users already know:
`--ssl-keyfile`, `--ssl-certfile`, `--ssl-ca-certs`, `--ssl-cert-reqs`, `--allowed-origins`,
`--allowed-methods`, `--allowed-headers`, `--allow-credentials`.

Two choices differ from vLLM, both towards the safer side: CORS is off unless origins are given
(vLLM answers every origin by default), and `--ssl-ca-certs` alone requires client certificates
(in vLLM it does nothing without `--ssl-cert-reqs 2`); an explicit `--ssl-cert-reqs` still wins.
"""

from __future__ import annotations

import argparse
import json
import ssl
from dataclasses import dataclass


@dataclass(frozen=True)
class TLSSettings:
    """A server's certificate, and the CA its clients' certificates must chain to (if any)."""

    certfile: str
    keyfile: str | None = None
    ca_certs: str | None = None
    cert_reqs: int | None = None  # ssl.CERT_*; None: required with ca_certs, else none

    @property
    def verify_mode(self) -> ssl.VerifyMode:
        if self.cert_reqs is not None:
            return ssl.VerifyMode(self.cert_reqs)
        return ssl.CERT_REQUIRED if self.ca_certs else ssl.CERT_NONE

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.certfile, self.keyfile)
        if self.ca_certs:
            context.load_verify_locations(self.ca_certs)
        context.verify_mode = self.verify_mode
        return context


@dataclass(frozen=True)
class CORSSettings:
    """Which browser origins may call the API, with what (starlette's CORSMiddleware terms)."""

    origins: tuple[str, ...]
    methods: tuple[str, ...] = ("*",)
    headers: tuple[str, ...] = ("*",)
    credentials: bool = False


def client_context(ca_certs: str | None) -> ssl.SSLContext | None:
    """What a client trusts: the system's CAs, or only `ca_certs` when given (None: defaults)."""
    if not ca_certs:
        return None
    return ssl.create_default_context(cafile=ca_certs)


def string_list(text: str) -> list[str]:
    """A JSON list (vLLM's form, '["https://a.example"]') or comma-separated values."""
    if text.lstrip().startswith("["):
        values = json.loads(text)
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise argparse.ArgumentTypeError("expected a JSON list of strings")
        return values
    return [part.strip() for part in text.split(",") if part.strip()]


def tls_from_args(args: argparse.Namespace) -> TLSSettings | None:
    if not args.ssl_certfile:
        if args.ssl_keyfile or args.ssl_ca_certs:
            raise ValueError("--ssl-keyfile and --ssl-ca-certs need --ssl-certfile")
        return None
    return TLSSettings(args.ssl_certfile, args.ssl_keyfile, args.ssl_ca_certs, args.ssl_cert_reqs)


def cors_from_args(args: argparse.Namespace) -> CORSSettings | None:
    if not args.allowed_origins:
        return None
    return CORSSettings(
        tuple(args.allowed_origins),
        tuple(args.allowed_methods),
        tuple(args.allowed_headers),
        args.allow_credentials,
    )
