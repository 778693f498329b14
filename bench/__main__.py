"""`python -m bench`: run the benchmarks and rewrite their tables in BENCHMARKS.md."""

from __future__ import annotations

import argparse
import sys

from bench import latency
from bench.report import stamp, table, write_section


def latency_section(presets: list[str], modes: list[str], repeats: int) -> str:
    parts = []
    for preset in presets:
        samples = latency.measure(preset, modes, repeats)
        base = latency.median(samples[modes[0]]) if "self-forcing" not in modes else (
            latency.median(samples["self-forcing"])
        )
        rows = []
        for mode in modes:
            med = latency.median(samples[mode])
            rows.append(
                [mode, f"{med:.4f}", f"{min(samples[mode]):.4f}", f"{max(samples[mode]):.4f}",
                 f"{base / med:.2f}x"]
            )
        parts.append(
            f"**{preset}** preset, 81 frames, {repeats} repeats, modes interleaved:\n\n"
            + table(["mode", "median s/frame", "min", "max", "speedup vs self-forcing"], rows)
        )
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--presets", nargs="+", default=["tiny", "bench"])
    parser.add_argument("--modes", nargs="+", default=["self-forcing", "histream+"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    body = latency_section(args.presets, args.modes, args.repeats)
    write_section("latency", stamp(command.strip()) + "\n\n" + body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
