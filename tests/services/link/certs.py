"""Test certificates for the link's TLS tests (openssl; a test skips where it is missing)."""

from __future__ import annotations

import shutil
import subprocess

import pytest


def make_cert(tmp_path, name: str) -> tuple[str, str]:
    """A self-signed certificate (its own CA) for DNS `name`; (cert, key) paths."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a test certificate")
    cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}",
         "-addext", f"subjectAltName=DNS:{name}"],
        check=True, capture_output=True,
    )  # fmt: skip
    return str(cert), str(key)
