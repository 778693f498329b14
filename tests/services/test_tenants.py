"""The tenants file: keys hashed on load, callers named by their key, reloads, bad files."""

from __future__ import annotations

import hashlib
import json
import logging
import os

import pytest

from services import tenants
from services.errors import Unauthenticated
from services.tenants import Tenancy, bearer, parse_tenants

KEY_A, KEY_B = "sk-alpha-0123456789", "sk-bravo-0123456789"
YAML = f"""
tenants:
  alpha:
    keys: ["{KEY_A}"]
  bravo:
    keys: ["sha256:{hashlib.sha256(KEY_B.encode()).hexdigest().upper()}"]
    quotas: {{}}
"""


@pytest.fixture(autouse=True)
def recheck_at_once(monkeypatch):
    monkeypatch.setattr(tenants, "RECHECK_S", 0.0)


def test_keys_name_their_tenant_and_plaintext_keys_are_not_kept(tmp_path, caplog):
    path = tmp_path / "tenants.yaml"
    path.write_text(YAML)
    with caplog.at_level(logging.DEBUG, logger="histream.gateway"):
        tenancy = Tenancy(str(path), "default")
    assert not tenancy.open and tenancy.names() == ["alpha", "bravo"]
    assert tenancy.authenticate(f"Bearer {KEY_A}") == "alpha"
    assert tenancy.authenticate(f"bearer   {KEY_B} ") == "bravo"
    assert tenancy.authenticate(KEY_A) == "alpha"  # gRPC metadata may carry the bare key
    assert KEY_A not in repr(vars(tenancy)) and KEY_A not in caplog.text


@pytest.mark.parametrize("authorization", [None, "", "Bearer ", "Bearer sk-nobody", "Basic xyz"])
def test_a_missing_or_unknown_key_is_unauthenticated(tmp_path, authorization):
    path = tmp_path / "tenants.json"
    path.write_text(json.dumps({"tenants": {"alpha": {"keys": [KEY_A]}}}))
    with pytest.raises(Unauthenticated) as err:
        Tenancy(str(path), "default").authenticate(authorization)
    assert err.value.http_status == 401 and err.value.code == "invalid_api_key"
    assert "sk-nobody" not in err.value.message


def test_without_a_file_every_caller_is_the_default_tenant(caplog):
    with caplog.at_level(logging.WARNING, logger="histream.gateway"):
        tenancy = Tenancy(None, "default")
    assert tenancy.open and tenancy.authenticate(None) == "default"
    assert tenancy.authenticate("Bearer anything") == "default" and tenancy.names() == ["default"]
    assert "the API is open" in caplog.text


def test_a_changed_file_is_read_again_and_a_broken_one_keeps_the_last_good(tmp_path, caplog):
    path = tmp_path / "tenants.yaml"
    path.write_text(YAML)
    tenancy = Tenancy(str(path), "default")
    path.write_text(f"tenants:\n  charlie:\n    keys: ['{KEY_A}', 'sk-charlie-2']\n")
    os.utime(path, (1, 1))  # a new modification time, whatever the clock's resolution
    assert tenancy.authenticate(f"Bearer {KEY_A}") == "charlie"
    with pytest.raises(Unauthenticated):
        tenancy.authenticate(f"Bearer {KEY_B}")  # bravo is gone
    path.write_text("tenants: [not a mapping")
    os.utime(path, (2, 2))
    with caplog.at_level(logging.ERROR, logger="histream.gateway"):
        assert tenancy.authenticate("Bearer sk-charlie-2") == "charlie"
    assert "not reloaded" in caplog.text


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"tenants": {"Alpha!": {"keys": ["k1"]}}}, "tenant='Alpha!' must be 1-63 characters"),
        ({"tenants": {"alpha": {"keys": []}}}, "tenants.alpha.keys"),
        ({"tenants": {"alpha": {"keys": ["sha256:abc"]}}}, "64 hex digits"),
        ({"tenants": {"a": {"keys": ["k1"]}, "b": {"keys": ["k1"]}}}, "given to both 'a' and 'b'"),
        ({"tenants": {"alpha": {"keys": ["k1"], "colour": "red"}}}, "tenants.alpha.colour"),
        ({"users": {}}, "users"),
        ({"tenants": {}}, "tenants"),
    ],
)
def test_a_bad_file_is_refused_naming_the_problem_never_a_key(document, message):
    with pytest.raises(ValueError, match=r"^t\.json: ") as err:
        parse_tenants(json.dumps(document), "t.json")
    assert message in str(err.value) and "k1" not in str(err.value).replace("keys", "")


def test_bearer():
    assert bearer("Bearer abc") == "abc" and bearer(None) is None and bearer("abc") == "abc"
