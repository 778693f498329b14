"""The tree shows the process split, and the imports keep it: each package imports only what
runs in its own process or what every process shares (read from the source, nothing run)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVING = {"ray", "grpc", "minio", "av", "fastapi", "starlette", "prometheus_client", "services"}
SHARED = {"services.errors", "services.settings", "services.media", "services.protocol",
          "services.storage", "services.tenants", "services.logs"}  # fmt: skip
# package -> the other services packages it may import (besides SHARED)
ALLOWED = {
    "protocol": set(),
    "storage": set(),
    "stages": {"services.link"},  # a replica serves its RPCs over gRPC too (grpc transport)
    "sessions": set(),
    "control": set(),
    "link": set(),  # a stage served over gRPC, and the client of one: either side of a link
    "jobs": {"services.sessions"},
    "gateway": {"services.sessions", "services.jobs", "services.link"},
    # starting the service is wiring; so is serving a stage outside Ray (decode-server)
    "local": {"services.app", "services.stages", "services.link"},
}


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_histream_model_imports_no_serving_package():
    for path in (ROOT / "histream_model").rglob("*.py"):
        bad = {n for n in imports(path) if n.split(".")[0] in SERVING}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_process_package_imports_only_its_own_and_the_shared(package):
    allowed = SHARED | ALLOWED[package] | {f"services.{package}"}
    for path in (ROOT / "services" / package).rglob("*.py"):
        for name in imports(path):
            if not name.startswith("services"):
                continue
            top = ".".join(name.split(".")[:2])
            assert top in allowed, f"{path.relative_to(ROOT)} imports {name}"


def test_every_services_package_is_checked():
    packages = {p.name for p in (ROOT / "services").iterdir() if (p / "__init__.py").exists()}
    assert packages == set(ALLOWED)


def test_the_chunk_step_is_written_once():
    """Only the schedules package runs a forward pass of a chunk (`forward_chunk`)."""
    callers = [
        p.relative_to(ROOT).as_posix()
        for p in [*(ROOT / "histream_model").rglob("*.py"), *(ROOT / "services").rglob("*.py")]
        if "forward_chunk(" in p.read_text() and p.name != "dit.py"
    ]
    assert callers == ["histream_model/schedules/execute.py"]
