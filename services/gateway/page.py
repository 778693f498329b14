"""The web player at `/`: one HTML page (its script and style inlined, from `static/`) that
streams a session over the WebSocket API, plays it through Media Source Extensions as chunks
arrive, changes its prompt mid-stream, and lists the tenant's finished videos. The page needs no
key to load; what it does is the API's, under the key typed into it when tenancy is on.

No `from __future__ import annotations` here: FastAPI reads the routes' annotations at runtime.
"""

import functools
import json
from importlib import resources

from fastapi.responses import HTMLResponse

from histream_model.config import MODES
from services.gateway.core import GatewayCore
from services.gateway.http import api
from services.gateway.requests import DEFAULT_MODE, model_ids

# a prompt the page starts with; the toy preset draws scenes of this grammar (training/data.py)
EXAMPLE_PROMPT = "a large red circle moving quickly left on a dark blue background"


@functools.cache
def _asset(name: str) -> str:
    return resources.files("services.gateway").joinpath("static", name).read_text("utf-8")


def render_page(config: dict) -> str:
    """index.html with its style, script and settings put in place (one request loads it all,
    and it works under any route prefix)."""
    settings = json.dumps(config).replace("</", "<\\/")  # nothing in it can end the <script>
    page = _asset("index.html")
    for marker, text in (
        ("/*PLAYER_CSS*/", _asset("player.css")),
        ("/*PLAYER_CONFIG*/", settings),
        ("/*PLAYER_JS*/", _asset("player.js")),
    ):
        page = page.replace(marker, text, 1)
    return page


def page_config(core: GatewayCore) -> dict:
    """What the page offers: this server's modes, sizes and lengths, and whether it needs a key."""
    preset = core.preset
    return {
        "model": core.settings.served_model,
        "preset": preset.name,
        "modes": [m for m in model_ids(core.settings.served_model) if m in MODES],
        "default_mode": DEFAULT_MODE,
        "size": f"{preset.width}x{preset.height}",
        "max_size": f"{preset.max_width}x{preset.max_height}",
        "num_frames": preset.num_frames,
        "max_num_frames": preset.max_num_frames,
        "max_session_seconds": core.settings.max_session_seconds,
        "tenancy": not core.tenancy.open,
        "example_prompt": EXAMPLE_PROMPT,
    }


class PageApi:
    core: GatewayCore

    @api.get("/", include_in_schema=False)
    async def player_page(self) -> HTMLResponse:
        page = render_page(page_config(self.core))
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})
