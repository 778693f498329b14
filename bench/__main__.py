"""`python -m bench`: run the benchmarks and rewrite their tables in BENCHMARKS.md.

Each section is written between its `<!-- bench:NAME -->` markers with the command, the machine
and the date; sections not run keep their previous tables.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from bench import (
    batch,
    batching,
    breakdown,
    charts,
    decoders,
    diagonal,
    durability,
    endless,
    gpu,
    health,
    link,
    load,
    memory,
    pipeline,
    quality,
    real_flops,
    serving,
    sweep,
    table2,
    transports,
)
from bench.report import stamp, write_section

Section = Callable[[argparse.Namespace], str]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# Section name (its BENCHMARKS.md marker) -> what produces its body.
SECTIONS: dict[str, Section] = {
    "table2": lambda a: "\n\n".join(
        table2.section(p, a.repeats, a.frames, _log) for p in a.table2_presets
    ),
    "real-flops": lambda a: real_flops.section(),
    "memory": lambda a: memory.section(_log),
    "breakdown": lambda a: breakdown.section(a.preset, a.breakdown_repeats, a.frames, _log),
    "decoders": lambda a: decoders.section(a.preset, a.decoder_repeats, a.frames, _log),
    "load": lambda a: load.section(a.load_preset, a.load_frames, log=_log),
    "batching": lambda a: "\n\n".join(
        batching.section(p, a.batching_frames, a.batching_repeats, log=_log)
        for p in a.batching_presets
    ),
    "serving": lambda a: "\n\n".join(
        serving.section(a.preset, a.serving_repeats, a.frames, _log, d) for d in a.serving_decoders
    ),
    "health": lambda a: health.section(log=_log),
    "durability": lambda a: durability.section(a.preset, a.frames, a.durability_repeats, _log),
    "sweep": lambda a: sweep.section(log=_log),
    "batch": lambda a: batch.section(a.batch_presets, a.batch_videos, log=_log),
    "pipeline": lambda a: pipeline.section(a.preset, a.frames, a.pipeline_repeats, _log),
    "diagonal-context": lambda a: diagonal.section(a.preset, a.frames, a.repeats, _log),
    "quality": lambda a: quality.section(
        a.frames, a.quality_seeds, a.quality_scenes, a.drift_seconds, a.quality_weights, _log
    ),
    # measured on a GPU machine by `python -m bench.gpu`; rendered here from its JSON files
    "endless": lambda a: endless.section(a.endless_preset, a.endless_minutes, _log),
    "link": lambda a: link.section(a.preset, a.link_chunks, a.link_repeats, _log),
    "transports": lambda a: transports.section(a.preset, a.transport_repeats, a.frames, _log),
    "table2-gpu": lambda a: gpu.section(a.gpu_json),
    # drawn from the tables above once they are written: keep it last
    "charts": lambda a: charts.section(_log),
}

MODEL_ONLY = {"real-flops"}  # sections computed by the FLOP model, not measured
STAMPED = {"table2-gpu", "charts"}  # sections that say themselves where and how they were measured


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--sections", nargs="+", choices=list(SECTIONS),
        default=[s for s in SECTIONS if s not in ("table2-gpu", "quality", "load", "batching")],
    )  # fmt: skip
    parser.add_argument("--preset", default="bench", help="preset of the measured sections")
    parser.add_argument("--frames", type=int, default=81, help="video frames (81 = 21 latent)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of table2")
    parser.add_argument("--breakdown-repeats", type=int, default=1)
    parser.add_argument("--serving-repeats", type=int, default=5)
    parser.add_argument("--decoder-repeats", type=int, default=2)
    parser.add_argument(
        "--serving-decoders", nargs="+", default=["wan"], help="serving: one table per decoder"
    )
    parser.add_argument("--load-preset", default="tiny", help="preset of the load section")
    parser.add_argument("--load-frames", type=int, default=81, help="frames per load session")
    parser.add_argument("--batching-presets", nargs="+", default=["tiny", "bench"])
    parser.add_argument("--batching-frames", type=int, default=45, help="frames per session")
    parser.add_argument("--batching-repeats", type=int, default=2)
    parser.add_argument("--durability-repeats", type=int, default=3)
    parser.add_argument("--pipeline-repeats", type=int, default=3)
    parser.add_argument(
        "--table2-presets", nargs="+", default=["bench", "tiny"], help="presets of table2"
    )
    parser.add_argument("--batch-presets", nargs="+", default=["tiny", "bench"])
    parser.add_argument("--batch-videos", type=int, default=8, help="videos of the tiny batch")
    parser.add_argument("--quality-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--quality-scenes", type=int, default=16, help="prompts of quality")
    parser.add_argument("--drift-seconds", type=int, default=30, help="quality: long videos")
    parser.add_argument(
        "--quality-weights", help="quality: a trained toy folder (default: shipped)"
    )
    parser.add_argument("--endless-preset", default="tiny", help="preset of the endless section")
    parser.add_argument("--endless-minutes", type=float, default=30.0)
    parser.add_argument("--link-chunks", type=int, default=6, help="link: chunks per session")
    parser.add_argument("--link-repeats", type=int, default=3)
    parser.add_argument("--transport-repeats", type=int, default=3)
    parser.add_argument("--gpu-json", nargs="+", default=[], help="table2-gpu: bench.gpu outputs")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md")
    args = parser.parse_args(argv)
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    for name in args.sections:
        _log(f"[bench] {name} ...")
        started = time.perf_counter()
        body = SECTIONS[name](args)
        _log(f"[bench] {name} done in {time.perf_counter() - started:.0f} s")
        print(body + "\n", flush=True)
        if not args.no_write:
            measured = name not in MODEL_ONLY
            head = "" if name in STAMPED else stamp(command.strip(), measured) + "\n\n"
            write_section(name, head + body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
