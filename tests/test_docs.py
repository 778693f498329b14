"""README's tables of settings against the code: a default the README states is the one the
service runs with (issue 17: docs that match the code)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from services.settings import ServeSettings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
UNITS = {"MiB": 1 << 20, "KiB": 1 << 10, "s": 1}


def section(title: str) -> str:
    start = README.index(title)
    end = README.find("\n### ", start + len(title))
    return README[start:end]


def defaults_table(title: str) -> dict[str, str]:
    """`setting` -> its default: the rows of a `| what (`setting`) | default | ... |` table."""
    rows = {}
    for line in section(title).splitlines():
        match = re.match(r"\|[^|]*\(`(\w+)`\)\s*\|\s*([^|]+?)\s*\|", line)
        if match:
            rows[match[1]] = match[2]
    return rows


def value(text: str) -> float:
    """'1 MiB' -> 1048576, '20 (bursts of 20)' -> 20, '600 s' -> 600."""
    match = re.match(r"([\d.]+)\s*(MiB|KiB|s)?\b", text)
    assert match, f"no number in {text!r}"
    return float(match[1]) * UNITS.get(match[2] or "", 1)


LIMITS = defaults_table("### Limits and overload")


def test_the_limits_table_names_settings():
    assert len(LIMITS) >= 8, LIMITS


@pytest.mark.parametrize("setting", sorted(LIMITS))
def test_each_limit_defaults_to_what_the_readme_says(setting):
    assert getattr(ServeSettings(), setting) == value(LIMITS[setting])


# "`setting` (30 s)", "`setting`, 30 s", "`setting` (default 60)", "`setting` (setting, default
# 3600)": a default
# the prose states next to a setting's name
INLINE = re.compile(
    r"`(?P<name>\w+)`(?:\s*\(|,\s*)(?:setting,\s*)?(?:default:?\s*)?(?P<value>\d+(?:\.\d+)?)\s*"
    r"(?P<unit>MiB|KiB|s|h)?[,;)\s]"
)
HOURS = {"h": 3600}


def inline_defaults() -> list[tuple[str, float, int]]:
    found = []
    for m in INLINE.finditer(README):
        if m["name"] in ServeSettings.model_fields:
            scale = {**UNITS, **HOURS}.get(m["unit"] or "", 1)
            found.append(
                (m["name"], float(m["value"]) * scale, README.count("\n", 0, m.start()) + 1)
            )
    return found


INLINE_DEFAULTS = inline_defaults()


def test_the_prose_states_defaults_next_to_settings():
    assert len(INLINE_DEFAULTS) >= 10, INLINE_DEFAULTS


@pytest.mark.parametrize(
    ("setting", "stated", "line"), INLINE_DEFAULTS, ids=[name for name, _, _ in INLINE_DEFAULTS]
)
def test_each_default_the_prose_states_is_the_settings(setting, stated, line):
    assert getattr(ServeSettings(), setting) == stated, f"README line {line}"


def test_the_throughput_options_are_off_by_default():
    """README, *Throughput*: the tiny decoder and phase batching are opt-in."""
    settings = ServeSettings()
    assert (settings.decoder, settings.phase_batch_size, settings.phase_batch_wait_s) == (
        "wan", 1, 0.0,
    )  # fmt: skip


def test_the_stage_transport_comes_from_the_environment(monkeypatch):
    """README, *Deploy on Kubernetes*: HISTREAM_STAGE_TRANSPORT=grpc on the Ray pods."""
    monkeypatch.setenv("HISTREAM_STAGE_TRANSPORT", "grpc")
    assert ServeSettings().stage_transport == "grpc"
    monkeypatch.setenv("HISTREAM_STAGE_TRANSPORT", "http")
    with pytest.raises(ValueError, match="stage_transport"):
        ServeSettings()


def test_make_runs_default_prompt_is_the_one_readme_names():
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    prompt = re.search(r"^PROMPT \?= (.+)$", makefile, re.MULTILINE)[1]
    stated = re.search(r'\(`PROMPT`, by\s+default "([^"]+)"\)', README)[1]
    assert prompt == " ".join(stated.split())
