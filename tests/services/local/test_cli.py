"""`histream generate`: embedded default, operator weights, report, and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from services.local import cli
from services.media import read_video

# generate on the fastest random-weight preset, where the test is not about the default model
TINY = ["generate", "--preset", "tiny"]


def test_generate_default_writes_mp4_and_report(tmp_path, capsys):
    """The embedded default: the toy preset with its shipped weights, at its own size."""
    out, report = tmp_path / "v.mp4", tmp_path / "r.json"
    code = cli.main(
        [
            "generate",
            "--prompt",
            "a large red circle moving quickly left on a dark blue background",
            "--out",
            str(out),
            "--report",
            str(report),
            "--num-frames",
            "33",
            "--no-progress",
        ]
    )
    assert code == 0
    assert read_video(out) == (33, 192, 128)
    data = json.loads(report.read_text())
    assert {k: data[k] for k in ("mode", "preset", "height", "width", "num_frames")} == {
        "mode": "histream+",
        "preset": "toy",
        "height": 128,
        "width": 192,
        "num_frames": 33,
    }
    assert [(c["index"], c["low_steps"], c["high_steps"]) for c in data["chunks"]] == [
        (0, 2, 2),
        (1, 1, 1),
        (2, 1, 1),
    ]
    chunk = data["chunks"][0]
    assert (
        chunk["kv_bytes"]["low"] > 0 and chunk["kv_bytes"]["high"] == 4 * chunk["kv_bytes"]["low"]
    )
    assert data["denoise_seconds_per_frame"] == pytest.approx(
        sum(c["seconds"] for c in data["chunks"]) / 33
    )
    assert data["decode_seconds"] > 0
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "steps"),
    [([], [5, 4, 3, 2, 2]), (["--diagonal-steps", "3,1"], [3, 1, 1, 1, 1])],
)
def test_generate_diagonal_takes_its_step_list(tmp_path, extra, steps):
    out, report = tmp_path / "d.mp4", tmp_path / "d.json"
    argv = [*TINY, "--prompt", "a fox", "--mode", "diagonal", "--num-frames", "57",
            "--out", str(out), "--report", str(report), "--no-progress", *extra]  # fmt: skip
    assert cli.main(argv) == 0
    chunks = json.loads(report.read_text())["chunks"]
    assert [c["high_steps"] for c in chunks] == steps
    assert [c["high_passes"] - c["high_steps"] for c in chunks] == [1, 0, 0, 0, 0]  # commits
    assert read_video(out) == (57, 192, 128)


def test_generate_from_operator_weights_directory(tmp_path, tiny_pipeline_dir):
    common = [*TINY, "--prompt", "a cat runs on the grass",
              "--height", "64", "--width", "96", "--num-frames", "9", "--mode", "histream",
              "--no-progress"]  # fmt: skip
    weights = ["--weights", str(tiny_pipeline_dir)]
    out = tmp_path / "w.mp4"
    assert cli.main([*common, *weights, "--out", str(out)]) == 0
    assert read_video(out) == (9, 96, 64)
    # the weights are what made it: the same call again gives the same bytes, and the same
    # call without them (the preset's built-in random weights) another video
    again, builtin = tmp_path / "again.mp4", tmp_path / "builtin.mp4"
    assert cli.main([*common, *weights, "--out", str(again)]) == 0
    assert cli.main([*common, "--out", str(builtin)]) == 0
    assert again.read_bytes() == out.read_bytes()
    assert builtin.read_bytes() != out.read_bytes()


def test_generate_with_the_tiny_decoder_from_its_checkpoint(tmp_path):
    from safetensors.torch import save_file

    from tests.histream_model.test_taehv import SMALL, small_model

    weights = tmp_path / "taew2_1.safetensors"
    save_file(dict(small_model(config=SMALL).state_dict()), weights)
    out, report = tmp_path / "t.mp4", tmp_path / "t.json"
    argv = [*TINY, "--prompt", "a fox", "--num-frames", "9", "--height", "64", "--width", "96",
            "--decoder", "taehv", "--decoder-weights", str(weights), "--out", str(out),
            "--report", str(report), "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    assert read_video(out) == (9, 96, 64)
    assert json.loads(report.read_text())["decode_seconds"] > 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prompt", "x", "--decoder-weights", "/no/taew.pth"], "'/no/taew.pth' does not exist"),
        (["--prompt", "   "], "prompt is empty"),
        (["--prompt", "x", "--height", "100"], "height=100"),
        (["--prompt", "x", "--width", "0"], "width=0"),
        (["--prompt", "x", "--num-frames", "80"], "num_frames=80"),
        (["--prompt", "x", "--num-frames", "85"], "not a whole number of 3-frame chunks"),
        (["--prompt", "x", "--mode", "turbo"], "unknown mode 'turbo'"),
        (["--prompt", "x", "--preset", "giant"], "unknown preset 'giant'"),
        (["--prompt", "x", "--weights", "/no/such/dir"], "'/no/such/dir' does not exist"),
        (["--prompt", "x", "--preset", "wan2.1-1.3b"], "no built-in weights"),
        (["--prompt", "x", "--diagonal-steps", "4,5"], "entry 1 (5) is not below entry 0 (4)"),
        (["--prompt", "x", "--diagonal-steps", "2,0"], "diagonal_steps[1]=0 must be an integer"),
        (["--prompt", "x", "--diagonal-steps", "four"], "comma-separated whole numbers"),
    ],
)
def test_bad_input_fails_before_model_work(tmp_path, capsys, monkeypatch, extra, message):
    built = []
    real = cli.load_components
    monkeypatch.setattr(cli, "load_components", lambda *a, **k: built.append(1) or real(*a, **k))
    out = tmp_path / "bad.mp4"
    assert cli.main(["generate", "--out", str(out), "--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert not out.exists()
    # only the missing-weights case may reach the loader, and it fails there before building
    assert not built or "no built-in weights" in message


def _serve(store) -> tuple[subprocess.Popen, str]:
    """`histream serve` on free ports over a local store; returns it and its base URL."""
    from tests.services.conftest import free_port

    http, grpc_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    server = subprocess.Popen(
        [sys.executable, "-m", "services.local.cli", "serve", "--preset", "tiny", "--http-port",
         str(http), "--grpc-port", str(grpc_port), "--storage", str(store)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    return server, f"http://127.0.0.1:{http}"


def _until(check, timeout_s: float, what: str):
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if result := check():
                return result
        except Exception:  # not up yet
            pass
        time.sleep(0.3)
    raise AssertionError(f"{what}: not within {timeout_s} s")


@pytest.mark.ray
def test_sigterm_while_starting_is_held_until_the_service_can_drain(tmp_path):
    """A SIGTERM sent the moment the HTTP proxy answers (Ray's own handler, which exits at once
    with 15, is still installed until start returns) still stops the service cleanly."""
    import time

    import httpx

    server, base = _serve(tmp_path / "store")
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if httpx.get(f"{base}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        server.send_signal(signal.SIGTERM)
        log, _ = server.communicate(timeout=120)
    finally:
        if server.poll() is None:
            server.kill()
    assert server.returncode == 0, log[-2000:]
    assert "stopped: 0 sessions and 0 jobs suspended" in log


@pytest.mark.ray
def test_sigterm_suspends_a_job_and_a_session_a_restart_completes_them_and_ctrl_c_stops_it(
    tmp_path,
):
    """What Kubernetes and process managers send: the service drains, suspending what runs
    where it stands (snapshots kept, media left open), and exits 0 with one line. Started
    again on the same storage, it takes the job up and completes it, and the session's client
    resumes it by id and gets every chunk once. Then what `make run` does on it: `histream
    submit` of one video, and Ctrl-C, which shuts it down cleanly (one server start fewer than
    a test of its own: `histream serve` starts in about 45 s on a 2-core machine)."""
    import httpx
    from websockets.sync.client import connect

    from services.storage import Layout, LocalStorage
    from tests.services.test_resume import Client

    store = tmp_path / "store"
    server, base = _serve(store)
    client = Client()
    try:
        with httpx.Client(base_url=base, timeout=30) as http:
            _until(lambda: http.get("/healthz").status_code == 200, 180, "healthy")
            video = http.post("/v1/videos", json={"prompt": "a fox", "seconds": "12"}).json()
            with connect(base.replace("http", "ws") + "/v1/sessions") as ws:
                ws.send(json.dumps({"type": "start", "prompt": "a cat", "num_frames": 201}))
                client.receive(ws, stop_after=0)
                url = f"/v1/videos/{video['id']}"
                _until(lambda: http.get(url).json()["progress"] > 0, 120, "job progress")
                server.send_signal(signal.SIGTERM)
                client.receive(ws)  # the chunks already started, then the end
        log, _ = server.communicate(timeout=120)
    finally:
        if server.poll() is None:
            server.kill()
    assert server.returncode == 0, log[-2000:]
    assert client.ended == {"type": "session.ended", "reason": "draining"}
    assert "stopped: 1 sessions and 1 jobs suspended" in log
    storage, layout = LocalStorage(store), Layout()
    record = json.loads(storage.get(layout.video_record_key(video["id"])))
    assert record["status"] == "in_progress"  # to go on after a restart, from its snapshot
    assert storage.exists(layout.snapshot_key("video", video["id"]))
    sid = client.started["session_id"]
    assert storage.exists(layout.snapshot_key("session", sid))
    playlist = storage.get(layout.session_playlist_key(sid)).decode()
    assert "#EXT-X-ENDLIST" not in playlist  # not ended: it goes on when resumed
    suspended_at = client.last

    server, base = _serve(store)  # the service is back
    try:
        with httpx.Client(base_url=base, timeout=30) as http:
            _until(lambda: http.get("/healthz").status_code == 200, 180, "healthy again")
            started = client.started
            resume = {"type": "resume", "session_id": sid, "last_chunk": suspended_at,
                      "session_token": started["session_token"]}  # fmt: skip
            with connect(base.replace("http", "ws") + "/v1/sessions") as ws:
                ws.send(json.dumps(resume))
                try:
                    client.receive(ws)
                except TimeoutError:  # seen in clean-clone CI runs: keep the server's side
                    server.send_signal(signal.SIGINT)
                    log, _ = server.communicate(timeout=120)
                    message = f"the resume went silent; server log:\n{log[-6000:]}"
                    raise AssertionError(message) from None
            url = f"/v1/videos/{video['id']}"
            done = _until(
                lambda: (r := http.get(url).json())["status"] in ("completed", "failed") and r,
                300, "the job taken up after the restart",
            )  # fmt: skip
            mp4 = http.get(url + "/content").content
        submitted = tmp_path / "submitted.mp4"
        code = cli.main(
            ["submit", "--url", base, "--wait-ready", "180",
             "--prompt", "a red fox", "--seconds", "1", "--out", str(submitted)]
        )  # fmt: skip
    finally:
        server.send_signal(signal.SIGINT)
        log, _ = server.communicate(timeout=120)
    assert server.returncode == 0, log[-2000:]
    assert "shutting down" in log
    assert code == 0 and read_video(submitted) == (21, 192, 128)
    assert client.ended == {"type": "session.ended", "reason": "completed"}, client.ended
    assert client.started["resumed"] and sorted(client.chunks) == list(range(17))
    assert client.video(tmp_path / "session.mp4") == (201, 192, 128)
    assert done["status"] == "completed" and done["progress"] == 100, done
    (tmp_path / "job.mp4").write_bytes(mp4)
    assert read_video(tmp_path / "job.mp4") == (done["num_frames"], 192, 128)
    assert not storage.exists(layout.snapshot_key("video", video["id"]))
    assert not storage.exists(layout.snapshot_key("session", sid))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "No such file"),
        ('{"tenants": {"Bad Name": {"keys": ["sk-1"]}}}', "tenant='Bad Name' must be"),
    ],
)
def test_serve_refuses_a_bad_tenants_file_before_starting(tmp_path, capsys, content, message):
    tenants = tmp_path / "tenants.json"
    if content is not None:
        tenants.write_text(content)
    code = cli.main(["serve", "--tenants", str(tenants), "--storage", str(tmp_path / "store")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "sk-1" not in err


def test_decode_server_serves_health_until_sigterm(tmp_path):
    """`histream decode-server`: the decoder loaded, SERVING on grpc.health.v1 for
    histream.v1.DecodeStage on the port it names; SIGTERM stops it cleanly."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server = subprocess.Popen(
        [sys.executable, "-m", "services.local.cli", "decode-server", "--preset", "tiny",
         "--port", "0", "--storage", str(tmp_path / "store")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        line = ""
        while "decode server:" not in line:
            line = server.stdout.readline()
            assert line or server.poll() is None, "decode-server exited before serving"
        address = line.rsplit(" on ", 1)[1].strip()
        channel = grpc.insecure_channel(address)
        request = health_pb2.HealthCheckRequest(service="histream.v1.DecodeStage")
        reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        channel.close()
        server.send_signal(signal.SIGTERM)
        # its output read meanwhile (a full pipe would block it); 1 s here unloaded, but this
        # runs niced beside the Ray tests in `make test`
        log, _ = server.communicate(timeout=180)
        assert server.returncode == 0, log[-3000:]
    finally:
        if server.poll() is None:
            server.kill()


def test_decode_server_refuses_half_a_tls_pair(tmp_path, capsys):
    code = cli.main(["decode-server", "--preset", "tiny", "--tls-cert", "c.pem"])
    assert code == 2 and "--tls-cert and --tls-key go together" in capsys.readouterr().err


@pytest.mark.parametrize("transport", ["handle", "grpc"])
def test_serve_takes_the_stage_transport(tmp_path, transport):
    parser = cli.build_parser()
    args = parser.parse_args(["serve", "--stage-transport", transport, "--storage", str(tmp_path)])
    assert cli.settings_from_args(args).stage_transport == transport
    default = parser.parse_args(["serve", "--storage", str(tmp_path)])
    assert cli.settings_from_args(default).stage_transport == "handle"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--stage-transport", "http"])
