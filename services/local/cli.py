"""The `histream` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from histream_model.components import (
    DECODERS,
    DTYPES,
    Components,
    WeightPaths,
    decoder_for,
    dtype_named,
    load_components,
    resolve_weights,
)
from histream_model.config import (
    DEFAULT_PRESET,
    MODES,
    PRESETS,
    get_mode,
    get_preset,
    parse_steps,
    with_options,
)
from histream_model.shape import VideoShape
from histream_model.text import check_prompt
from histream_model.weights.common import require_path


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=DEFAULT_PRESET,
                   help=f"one of {sorted(PRESETS)} (default: {DEFAULT_PRESET})")  # fmt: skip
    p.add_argument("--weights", help="directory with operator-provided weights (see README)")
    p.add_argument("--dit", help="DiT checkpoint, overriding the one found in --weights")
    p.add_argument("--vae", help="VAE checkpoint, overriding the one found in --weights")
    p.add_argument("--text-encoder", help="directory with text_encoder/ + tokenizer/")
    p.add_argument(
        "--decoder",
        choices=DECODERS,
        help="streaming decoder: wan (the VAE's, default) or taehv (tiny, see README)",
    )
    p.add_argument("--decoder-weights",
                   help="the decoder's checkpoint (taehv: taew2_1.safetensors/.pth; default: "
                   "one in --weights)")  # fmt: skip
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), help="default: bfloat16 on GPU, float32 on CPU"
    )
    p.add_argument(
        "--diagonal-steps", metavar="N,N,...",
        help="mode diagonal: steps of chunk 1, 2, ..., the last kept after (default 5,4,3,2)",
    )  # fmt: skip


def _add_storage_args(parser: argparse.ArgumentParser) -> None:
    store = parser.add_argument_group("storage (default: a local directory)")
    store.add_argument("--storage", help="local directory (default: outputs/storage)")
    store.add_argument("--s3-endpoint", help="S3-compatible endpoint host:port (uses S3)")
    store.add_argument("--s3-bucket", default=None)
    store.add_argument("--s3-access-key", default=None)
    store.add_argument("--s3-secret-key", default=None)
    store.add_argument("--s3-secure", action="store_true", help="HTTPS to the S3 endpoint")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="histream", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate one video in this process (no Ray)")
    gen.add_argument("--prompt", required=True)
    _add_model_args(gen)
    gen.add_argument("--mode", default="histream+", help=f"one of {list(MODES)}")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--num-frames", type=int, help="1 + 4k frames (default: the preset's, 81)")
    gen.add_argument("--height", type=int, help="pixels (default: the preset's)")
    gen.add_argument("--width", type=int, help="pixels (default: the preset's)")
    gen.add_argument("--out", required=True, help="output MP4 path")
    gen.add_argument("--report", help="write a JSON timing report here")
    gen.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    srv = sub.add_parser("serve", help="run the service on a local Ray until Ctrl-C")
    _add_model_args(srv)
    srv.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    srv.add_argument("--http-port", type=int, default=8000)
    srv.add_argument("--grpc-port", type=int, default=9000)
    srv.add_argument("--ray-address", help="join this Ray cluster instead of starting one")
    srv.add_argument(
        "--tenants", help="tenants file: API keys -> tenants (YAML/JSON; default: an open API)"
    )
    srv.add_argument("--decode-target", help="host:port of a `histream decode-server` to decode "
                     "on, over gRPC (default: the DecodePool deployment)")  # fmt: skip
    srv.add_argument("--stage-transport", choices=["handle", "grpc"],
                     help="how the stages are called: Serve handles (default) or each stage "
                     "replica's own gRPC server (README, *Stage transports*)")  # fmt: skip
    _add_storage_args(srv)

    dec = sub.add_parser(
        "decode-server", help="serve the decode stage over gRPC, outside Ray (DecodeStage)"
    )
    _add_model_args(dec)
    dec.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    dec.add_argument("--port", type=int, default=9100, help="gRPC port (0: a free one)")
    dec.add_argument("--tls-cert", help="PEM certificate: serve TLS (with --tls-key)")
    dec.add_argument("--tls-key", help="PEM private key of --tls-cert")
    dec.add_argument("--tls-client-ca", help="PEM CA: clients must present a cert it signed")
    _add_storage_args(dec)

    cli = sub.add_parser("submit", help="generate one video through a running server's HTTP API")
    cli.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    cli.add_argument("--prompt", required=True)
    cli.add_argument("--size", help="WIDTHxHEIGHT (default: the served preset's)")
    cli.add_argument("--seconds", help="whole seconds (default: the preset's 81 frames)")
    cli.add_argument("--mode", help=f"one of {list(MODES)}")
    cli.add_argument("--seed", type=int)
    cli.add_argument("--out", required=True, help="where to write the MP4")
    cli.add_argument("--wait-ready", type=float, default=0, help="seconds to wait for /healthz")
    cli.add_argument("--api-key", default=os.environ.get("HISTREAM_API_KEY"),
                     help="the tenant's API key (default: $HISTREAM_API_KEY)")  # fmt: skip
    cli.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the video")
    bat = sub.add_parser(
        "batch", help="run a JSONL file of /v1/videos requests as a batch and download the results"
    )
    bat.add_argument("requests", help='JSONL: {"custom_id", "method": "POST", "url": "/v1/videos", '
                     '"body": {...}} per line')  # fmt: skip
    bat.add_argument("--out", required=True, help="directory for output.jsonl, errors.jsonl and "
                     "<custom_id>.mp4")  # fmt: skip
    bat.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    bat.add_argument("--wait-ready", type=float, default=0, help="seconds to wait for /healthz")
    bat.add_argument("--api-key", default=os.environ.get("HISTREAM_API_KEY"),
                     help="the tenant's API key (default: $HISTREAM_API_KEY)")  # fmt: skip
    bat.add_argument("--timeout", type=float, default=24 * 3600, help="seconds to wait")
    for name, what in (
        ("train", "train the toy preset's weights from scratch (python -m training --help)"),
        ("eval", "score prompt adherence of every mode (python -m training.evaluate --help)"),
    ):
        tool = sub.add_parser(name, help=what, add_help=False)
        tool.add_argument("args", nargs=argparse.REMAINDER, help="its own options")
    return parser


def weights_from_args(args: argparse.Namespace) -> WeightPaths | None:
    if args.weights is None and args.dit is None:
        return None
    return resolve_weights(args.weights, args.dit, args.vae, args.text_encoder)


def preset_from_args(args: argparse.Namespace):
    preset = get_preset(args.preset)
    if args.diagonal_steps is not None:
        preset = with_options(preset, diagonal_steps=parse_steps(args.diagonal_steps))
    return preset


def components_from_args(args: argparse.Namespace, weights: WeightPaths | None) -> Components:
    return load_components(
        preset_from_args(args),
        weights,
        device=args.device,
        dtype=dtype_named(args.dtype),
        decoder=args.decoder or "wan",
        decoder_weights=args.decoder_weights,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from services.local.generate import generate_video

    # Everything a user can get wrong is checked before any model is built or loaded.
    preset = preset_from_args(args)
    mode = get_mode(args.mode)
    prompt = check_prompt(args.prompt)
    VideoShape(
        preset,
        mode,
        preset.height if args.height is None else args.height,
        preset.width if args.width is None else args.width,
        preset.num_frames if args.num_frames is None else args.num_frames,
    )
    weights = weights_from_args(args)
    if args.decoder_weights is not None:
        require_path(args.decoder_weights, "decoder weights")
    components = components_from_args(args, weights)
    shape = {k: getattr(args, k) for k in ("mode", "seed", "num_frames", "height", "width")}
    report = generate_video(components, prompt, args.out, progress=not args.no_progress, **shape)
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(report.to_json())
    print(
        f"wrote {args.out} ({report.num_frames} frames, {report.width}x{report.height}); "
        f"denoising {report.denoise_seconds_per_frame:.4f} s/frame, "
        f"decoding {report.decode_seconds:.2f} s"
    )
    return 0


def settings_from_args(args: argparse.Namespace):
    """ServeSettings from the environment (HISTREAM_*) overridden by the command line."""
    from services.settings import ServeSettings
    from services.storage import StorageSettings

    overrides = {
        "local_dir": args.storage,
        "endpoint": args.s3_endpoint,
        "bucket": args.s3_bucket,
        "access_key": args.s3_access_key,
        "secret_key": args.s3_secret_key,
        "secure": True if args.s3_secure else None,
    }
    storage = StorageSettings(**{k: v for k, v in overrides.items() if v is not None})
    fields = {
        "preset": args.preset,
        "weights": args.weights,
        "dit": args.dit,
        "vae": args.vae,
        "text_encoder": args.text_encoder,
        "decoder": args.decoder,
        "decoder_weights": args.decoder_weights,
        "device": args.device,
        "dtype": args.dtype,
        "http_host": args.host,
        "http_port": getattr(args, "http_port", None),
        "grpc_port": getattr(args, "grpc_port", None),
        "tenants_file": str(Path(args.tenants).resolve())
        if getattr(args, "tenants", None)
        else None,
        "diagonal_steps": parse_steps(args.diagonal_steps) if args.diagonal_steps else None,
        "decode_target": getattr(args, "decode_target", None),
        "stage_transport": getattr(args, "stage_transport", None),
    }
    return ServeSettings(storage=storage, **{k: v for k, v in fields.items() if v is not None})


def cmd_serve(args: argparse.Namespace) -> int:
    from services.local.server import serve_forever

    settings = settings_from_args(args)
    weights = settings.weight_paths()  # a missing weights path fails here, before Ray starts
    if settings.decoder == "taehv":  # so does a tiny decoder that cannot load (it is small)
        decoder_for(settings.get_preset(), "taehv", weights, settings.decoder_weights, device="cpu")
    if settings.tenants_file:  # so does a tenants file that is missing or does not parse
        from services.tenants import parse_tenants

        parse_tenants(Path(settings.tenants_file).read_text(), settings.tenants_file)
    serve_forever(settings, ray_address=args.ray_address)
    return 0


def cmd_decode_server(args: argparse.Namespace) -> int:
    """The decode stage on its own, over gRPC, until SIGINT or SIGTERM."""
    import signal
    import threading

    from services.link import StageServer, tls_credentials
    from services.stages import DecodeStage

    settings = settings_from_args(args)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    credentials = (
        tls_credentials(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    )
    stage = DecodeStage(settings)  # loads the decoder before the port opens
    address = f"{args.host}:{args.port}"
    server = StageServer(stage, "DecodeStage", address, settings.get_preset(), credentials)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    port = server.start()
    print(f"decode server: histream.v1.DecodeStage on {args.host}:{port}", flush=True)
    stop.wait()
    server.stop(grace_s=settings.drain_timeout_s)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from services.local.client import submit_video

    body = {k: getattr(args, k) for k in ("size", "seconds", "mode", "seed")}
    path = submit_video(
        args.url,
        args.prompt,
        args.out,
        wait_ready_s=args.wait_ready,
        timeout_s=args.timeout,
        api_key=args.api_key,
        **body,
    )
    print(f"video: {path}")
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from services.local.client import run_batch

    batch = run_batch(
        args.url, args.requests, args.out, wait_ready_s=args.wait_ready,
        timeout_s=args.timeout, api_key=args.api_key,
    )  # fmt: skip
    counts = batch["request_counts"]
    print(
        f"batch {batch['id']} {batch['status']}: {counts['completed']} completed, "
        f"{counts['failed']} failed of {counts['total']}; results in {args.out}"
    )
    return 0 if batch["status"] == "completed" else 1


def cmd_train(args: argparse.Namespace) -> int:
    from training.__main__ import main as train_main

    return train_main(args.args)


def cmd_eval(args: argparse.Namespace) -> int:
    from training.evaluate import main as eval_main

    return eval_main(args.args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("train", "eval"):  # their options (--help too) are their own
        args = argparse.Namespace(command=argv[0], args=list(argv[1:]))
    else:
        args = build_parser().parse_args(argv)
    commands = {
        "train": cmd_train,
        "eval": cmd_eval,
        "generate": cmd_generate,
        "serve": cmd_serve,
        "decode-server": cmd_decode_server,
        "submit": cmd_submit,
        "batch": cmd_batch,
    }
    try:
        return commands[args.command](args)
    except (ValueError, FileNotFoundError) as err:
        print(f"histream {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
