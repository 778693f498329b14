"""The benchmark charts are drawn from BENCHMARKS.md's own tables (bench/charts.py)."""

from __future__ import annotations

import pytest

from bench import charts
from bench.report import BENCHMARKS

SMALL = """
intro
<!-- bench:table2 -->
Measured ...

| mode (paper row) | median s/frame | FLOP-model speedup |
|---|---|---|
| `self-forcing` (Self Forcing) | 0.40 | 1.00x |
| `histream+` (HiStream+) | 0.10 | 4.00x |

second table

| a | b |
|:--|--:|
| 1 | 2 |
<!-- /bench:table2 -->
<!-- bench:memory -->
{memory_headers}
|---|---|---|---|---|---|
| 21 | 81 | 59.5 | 59.5 | 207.0 | 207.0 |
| 42 | 165 | 59.5 | 59.5 | 413.4 | 413.4 |
<!-- /bench:memory -->
""".format(
    memory_headers="| latent frames | video frames | AGSW (`histream`) MB measured | model "
    "| full history (`no-agsw`) MB measured | model |"
)


def test_tables_are_read_per_section_with_their_numbers() -> None:
    found = charts.tables(charts.section_text(SMALL, "table2"))
    assert [headers for headers, _ in found] == [
        ["mode (paper row)", "median s/frame", "FLOP-model speedup"],
        ["a", "b"],
    ]
    modes = [charts.mode_name(c) for c in charts.column(found[0], "mode (paper row)")]
    assert modes == ["self-forcing", "histream+"]
    assert [charts.number(c) for c in charts.column(found[0], "FLOP-model speedup")] == [1.0, 4.0]
    assert charts.number("165 (61%)") == 165.0 and charts.number("-0.5 s") == -0.5
    with pytest.raises(ValueError, match="no number in table cell ''"):
        charts.number("")
    assert charts.section_text(SMALL, "breakdown") == ""


def test_only_the_charts_whose_tables_exist_are_drawn(tmp_path) -> None:
    source = tmp_path / "B.md"
    source.write_text(SMALL)
    written = charts.write(source, tmp_path / "out")
    assert sorted(p.name for p in written) == ["latency.png", "memory.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written)


def test_the_real_tables_give_every_chart(tmp_path) -> None:
    """BENCHMARKS.md's tables still have the columns the charts read."""
    written = charts.write(BENCHMARKS, tmp_path)
    assert sorted(p.stem for p in written) == sorted(charts.CHARTS_BY_NAME)
