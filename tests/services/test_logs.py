"""The service's logs: ids as fields of their own in JSON, through Serve's replica handlers;
the deployments' encoding from the settings; prompts never logged."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest
from ray._common.formatters import JSONFormatter

from services.app import build_app
from services.logs import ROOT, SERVE_LOGGER, ids, through_serve
from services.protocol import StreamKind
from services.sessions import SessionDriver
from services.settings import ServeSettings
from tests.services.fakes import real_stages
from tests.services.harness import run, session_plan


@pytest.fixture
def loggers():
    """The two loggers' state, restored afterwards."""
    ours, serve_logger = logging.getLogger(ROOT), logging.getLogger(SERVE_LOGGER)
    saved = [(lg, list(lg.handlers), lg.level, lg.propagate) for lg in (ours, serve_logger)]
    yield ours, serve_logger
    for lg, handlers, level, propagate in saved:
        lg.handlers, lg.level, lg.propagate = handlers, level, propagate


def test_ids_leave_out_what_is_not_known():
    assert ids("acme", video_id="video_1") == {"tenant": "acme", "video_id": "video_1"}
    assert ids() == {}


def test_in_a_replica_our_lines_go_through_serves_handlers_with_the_ids_as_fields(loggers):
    ours, serve_logger = loggers
    out = io.StringIO()
    handler = logging.StreamHandler(out)  # as Serve sets up a replica with encoding JSON
    handler.setFormatter(JSONFormatter())
    serve_logger.handlers = [handler]
    through_serve()
    plan = session_plan(kind=StreamKind.SESSION, object_id="sess_42")
    logging.getLogger("histream.sessions").warning(
        "session %s: restoring", plan.object_id, extra=plan.log_ids()
    )
    line = json.loads(out.getvalue())
    assert line["message"] == "session sess_42: restoring" and line["levelname"] == "WARNING"
    assert (line["tenant"], line["session_id"]) == ("default", "sess_42")
    assert "video_id" not in line and ours.propagate is False


def test_outside_a_replica_logging_is_left_alone(loggers):
    ours, serve_logger = loggers
    serve_logger.handlers = []
    ours.handlers, ours.propagate = [], True
    through_serve()
    assert ours.handlers == [] and ours.propagate is True


@pytest.mark.parametrize("encoding", ["TEXT", "JSON"])
def test_every_deployment_logs_in_the_configured_encoding(encoding):
    gateway = build_app(ServeSettings(preset="tiny", log_encoding=encoding))._bound_deployment
    bound = [a._bound_deployment for a in gateway.init_args if hasattr(a, "_bound_deployment")]
    deployments = {d.name: d for d in [gateway, *bound]}
    assert len(deployments) == 5, sorted(deployments)
    for deployment in deployments.values():
        assert deployment.logging_config["encoding"] == encoding


def test_a_bad_encoding_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="log_encoding"):
        ServeSettings(log_encoding="XML")


def test_a_prompt_is_never_logged(tmp_path, caplog):
    """A session with a prompt update through the real stages, every logger at DEBUG: neither
    prompt appears in any message or field."""
    secret, update = "a violet giraffe 7f3c", "a teal heron 9d1e"
    stages = real_stages(tmp_path / "store")
    driver = SessionDriver(stages.handles, session_plan(frames=69, prompt=secret))

    async def go():
        await driver.open()
        updating = None
        async for chunk in driver.chunks():
            if chunk.index == 0:
                updating = asyncio.create_task(driver.update_prompt(update))
        await driver.finish()
        return await updating

    with caplog.at_level(logging.DEBUG):
        assert run(go())[0] == 1  # the update applied
    assert caplog.records  # the stages did log (opened, ...)
    for record in caplog.records:
        text = record.getMessage() + " " + " ".join(map(str, vars(record).values()))
        assert secret not in text and update not in text, record.getMessage()
