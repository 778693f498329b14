"""Charts of the measured tables: `python -m bench --sections charts` (and every `make bench`).

Each chart is drawn from the tables BENCHMARKS.md holds between its `bench:` markers, so a chart
always shows the figures printed beside it, measured by the command named there; a section not
yet measured leaves its chart out. PNGs go to `bench/charts/`, which BENCHMARKS.md and the
README embed:
- `latency.png`: per-frame denoising latency per mode, measured and as the FLOP model predicts
  from self-forcing's (H100 at 1920x1088, and the CPU `bench` preset);
- `memory.png`: a session's cache memory against video length, AGSW against full history;
- `breakdown.png`: where a chunk's time goes, step by step (CPU `bench` preset);
- `throughput.png`: frames/s against concurrent sessions, through the service (CPU, `tiny`)
  and for the denoisers batched on an H100.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from bench.report import BENCHMARKS

CHARTS = Path(__file__).resolve().parent / "charts"
Table = tuple[list[str], list[list[str]]]


def section_text(text: str, name: str) -> str:
    """The body between `<!-- bench:name -->` and its end marker ('' when absent)."""
    found = re.search(rf"<!-- bench:{re.escape(name)} -->(.*?)<!-- /bench:{re.escape(name)} -->",
                      text, re.S)  # fmt: skip
    return found.group(1) if found else ""


def tables(text: str) -> list[Table]:
    """The markdown tables of a text, in order: (headers, rows of cells)."""
    out: list[Table] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        is_table = lines[i].startswith("|") and i + 1 < len(lines)
        if is_table and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", lines[i + 1].strip()):
            headers = _cells(lines[i])
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            out.append((headers, rows))
        else:
            i += 1
    return out


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def number(cell: str) -> float:
    """The first number in a cell ('4.06x' -> 4.06, '0.3917' -> 0.3917, '165 (61%)' -> 165)."""
    found = re.search(r"-?\d+(?:\.\d+)?", cell)
    if found is None:
        raise ValueError(f"no number in table cell {cell!r}")
    return float(found.group())


def first_table(text: str, section: str) -> Table | None:
    """The first table of a BENCHMARKS.md section, None when the section holds none."""
    found = tables(section_text(text, section))
    return found[0] if found else None


def column(table: Table, name: str) -> list[str]:
    headers, rows = table
    index = headers.index(name)
    return [row[index] for row in rows]


def mode_name(cell: str) -> str:
    """'`histream+` (HiStream+)' -> 'histream+'."""
    found = re.search(r"`([^`]+)`", cell)
    return found.group(1) if found else cell


def _latency(ax, table: Table, title: str) -> None:
    modes = [mode_name(c) for c in column(table, table[0][0])]
    measured = [number(c) for c in column(table, "median s/frame")]
    model_speedup = [number(c) for c in column(table, "FLOP-model speedup")]
    predicted = [measured[0] / s for s in model_speedup]  # the first row is self-forcing
    xs = range(len(modes))
    ax.bar(xs, measured, color="C0", label="measured")
    ax.scatter(xs, predicted, color="C3", marker="_", s=300, linewidths=2.5,
               label="FLOP model (self-forcing / model speedup)", zorder=3)  # fmt: skip
    ax.set_xticks(list(xs), modes, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("s per frame")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)


def latency(text: str, plt) -> object | None:
    panels = []
    gpu = tables(section_text(text, "table2-gpu"))
    if gpu:
        panels.append((gpu[0], "H100, Wan2.1-1.3B sizes, 1920x1088, bf16"))
    cpu = tables(section_text(text, "table2"))
    if cpu:
        panels.append((cpu[0], "CPU (2 cores), `bench` preset, 640x384"))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.2), squeeze=False)
    for ax, (table, title) in zip(axes[0], panels, strict=True):
        _latency(ax, table, title)
    fig.suptitle("Per-frame denoising latency per mode (81 frames)")
    return fig


def memory(text: str, plt) -> object | None:
    table = first_table(text, "memory")
    if table is None:
        return None
    frames = [number(c) for c in column(table, "video frames")]
    agsw = [number(c) for c in column(table, "AGSW (`histream`) MB measured")]
    full = [number(c) for c in column(table, "full history (`no-agsw`) MB measured")]
    fig, ax = plt.subplots(figsize=(6.2, 4.0))
    ax.plot(frames, full, "o-", color="C3", label="full history (`no-agsw`)")
    ax.plot(frames, agsw, "o-", color="C0", label="anchor + window (`histream`, AGSW)")
    ax.set_xlabel("video frames")
    ax.set_ylabel("session cache MB (measured)")
    ax.set_title("Session memory against video length (CPU `bench` preset, fp32)", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def breakdown(text: str, plt) -> object | None:
    table = first_table(text, "breakdown")
    if table is None:
        return None
    steps = [s.strip("`") for s in column(table, "step")]
    modes = [h.split()[0].strip("`") for h in table[0] if h.endswith("s/video")]
    fig, ax = plt.subplots(figsize=(7.0, 3.2))
    for row, mode in enumerate(modes):
        left = 0.0
        for k, (step, cell) in enumerate(zip(steps, column(table, f"`{mode}` s/video"),
                                              strict=True)):  # fmt: skip
            width = number(cell)
            ax.barh(row, width, left=left, color=f"C{k}", label=step if row == 0 else None)
            left += width
    ax.set_yticks(range(len(modes)), modes)
    ax.set_xlabel("seconds per 81-frame video")
    ax.set_title("Where a chunk's time goes (CPU `bench` preset, 640x384)", fontsize=10)
    ax.legend(fontsize=7, ncol=len(steps), loc="upper center", bbox_to_anchor=(0.5, -0.28))
    return fig


def throughput(text: str, plt) -> object | None:
    service = tables(section_text(text, "load"))
    gpu = [t for t in tables(section_text(text, "table2-gpu")) if t[0][0] == "sessions"]
    panels = [p for p in (service[:1], gpu[:1]) if p]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.0), squeeze=False)
    ax = iter(axes[0])
    if service:
        a, table = next(ax), service[0]
        lines: dict[str, tuple[list[float], list[float]]] = {}
        for row in table[1]:
            key = f"{row[0].strip('`')}, batching {row[1]}"
            xs, ys = lines.setdefault(key, ([], []))
            xs.append(number(row[2]))
            ys.append(number(row[3]))
        for key, (xs, ys) in lines.items():
            a.plot(xs, ys, "o-", label=key)
        a.set_xscale("log", base=2)
        a.set_xlabel("concurrent sessions")
        a.set_ylabel("frames/s, all sessions")
        a.set_title("Through the service (CPU, 2 cores, `tiny`, decoder bound)", fontsize=10)
        a.legend(fontsize=8)
    if gpu:
        a, table = next(ax), gpu[0]
        xs = [number(c) for c in column(table, "sessions")]
        a.plot(xs, [number(c) for c in column(table, "frames/s, off")], "o-", label="batching off")
        a.plot(xs, [number(c) for c in column(table, "frames/s, on")], "o-", label="batching on")
        a.set_xscale("log", base=2)
        a.set_xlabel("concurrent sessions")
        a.set_ylabel("denoised frames/s, all sessions")
        a.set_title("Denoisers alone on an H100 (832x480, 1.3B sizes)", fontsize=10)
        a.legend(fontsize=8)
    return fig


CHARTS_BY_NAME: dict[str, Callable[[str, object], object | None]] = {
    "latency": latency,
    "memory": memory,
    "breakdown": breakdown,
    "throughput": throughput,
}


def write(source: Path = BENCHMARKS, out: Path = CHARTS) -> list[Path]:
    """Every chart whose tables `source` holds, as `out/NAME.png`; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    text = source.read_text()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in CHARTS_BY_NAME.items():
        fig = draw(text, plt)
        if fig is None:
            continue
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def section(log: Callable[[str], None] | None = None) -> str:
    """Writes the charts; the markdown that shows them (BENCHMARKS.md's `charts` block)."""
    paths = write()
    names = [str(p.relative_to(BENCHMARKS.parent)) for p in paths]
    if log:
        log("wrote " + ", ".join(names))
    return (
        "Drawn by `python -m bench --sections charts` (the last step of `make bench`) from the "
        "tables in this file, each measured as its section says.\n\n"
        + "\n\n".join(f"![{Path(n).stem}]({n})" for n in names)
    )
