"""`python -m bench` writes each section between its markers in BENCHMARKS.md and leaves the
rest of the file as it was (bench/report.py)."""

from __future__ import annotations

from bench.report import write_section


def test_a_section_is_replaced_between_its_markers_and_the_rest_kept(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(
        "# Benchmarks\n\nprose before\n\n<!-- bench:link -->\nold table\n<!-- /bench:link -->\n\n"
        "prose after\n"
    )
    write_section("link", "new table\n", path)
    assert path.read_text() == (
        "# Benchmarks\n\nprose before\n\n<!-- bench:link -->\nnew table\n<!-- /bench:link -->\n\n"
        "prose after\n"
    )
    write_section("transports", "a new section", path)  # no markers yet: appended with them
    assert path.read_text().endswith(
        "prose after\n\n<!-- bench:transports -->\na new section\n<!-- /bench:transports -->\n"
    )
