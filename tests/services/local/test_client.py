"""`histream submit` and `histream batch` against a real HTTP server without Ray (README,
*Tenants*: `--api-key`, or `HISTREAM_API_KEY`, sends the tenant's key): the gateway's app on
uvicorn over the real in-process stages, its tenants file holding one key. With the key the MP4
and the batch's results arrive; without it the command fails with the server's message."""

from __future__ import annotations

import json

import pytest

from services.local import cli
from services.media import read_video
from tests.services.fakes import real_stages
from tests.services.gateway.local_app import serving, settings_for

KEY = "sk-cli-0123456789"


@pytest.fixture
def server(tmp_path):
    tenants = tmp_path / "tenants.json"
    tenants.write_text(json.dumps({"tenants": {"alpha": {"keys": [KEY]}}}))
    settings = settings_for(tmp_path / "store", tenants_file=str(tenants))
    with serving(settings, real_stages(tmp_path / "store").handles) as url:
        yield url


def test_submit_sends_the_key_from_its_flag_or_the_environment(
    server, tmp_path, monkeypatch, capsys
):
    submit = ["submit", "--url", server, "--prompt", "a red fox", "--seconds", "1",
              "--size", "96x64", "--wait-ready", "10"]  # fmt: skip
    assert cli.main([*submit, "--out", str(tmp_path / "none.mp4")]) == 2
    assert "HTTP 401: no API key" in capsys.readouterr().err
    assert not (tmp_path / "none.mp4").exists()

    assert cli.main([*submit, "--api-key", KEY, "--out", str(tmp_path / "flag.mp4")]) == 0
    assert read_video(tmp_path / "flag.mp4") == (21, 96, 64)
    monkeypatch.setenv("HISTREAM_API_KEY", KEY)  # read when the parser is built
    assert cli.main([*submit, "--out", str(tmp_path / "env.mp4")]) == 0
    assert read_video(tmp_path / "env.mp4") == (21, 96, 64)


def test_batch_sends_the_key_and_writes_each_video_and_the_results(server, tmp_path, capsys):
    lines = [
        {"custom_id": name, "method": "POST", "url": "/v1/videos",
         "body": {"prompt": "a red fox", "seconds": "1", "size": "96x64", "seed": seed}}
        for seed, name in enumerate(["first", "second"])
    ]  # fmt: skip
    requests = tmp_path / "in.jsonl"
    requests.write_text("\n".join(map(json.dumps, lines)))
    out = tmp_path / "out"
    batch = ["batch", str(requests), "--url", server, "--out", str(out)]
    assert cli.main([*batch, "--api-key", "sk-wrong"]) == 2
    assert "HTTP 401: the API key is not valid" in capsys.readouterr().err
    assert cli.main([*batch, "--api-key", KEY]) == 0
    assert "completed: 2 completed, 0 failed of 2" in capsys.readouterr().out
    results = [json.loads(x) for x in (out / "output.jsonl").read_text().splitlines()]
    assert sorted(r["custom_id"] for r in results) == ["first", "second"]
    for name in ("first", "second"):
        assert read_video(out / f"{name}.mp4") == (21, 96, 64)
