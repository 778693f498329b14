"""What crosses between the gateway and the stages (README, *The service*): latents, and the
text context once per prompt per denoising stage; KV caches never travel. A streaming session
with a prompt change runs over the real stages in this process (no Ray), and every tensor in
every stage call and answer is looked at."""

from __future__ import annotations

import pytest
from google.protobuf.message import Message

from protos.histream.v1 import stages_pb2
from tests.services import fakes
from tests.services.fakes import real_stages
from tests.services.gateway.local_app import gateway_client, settings_for
from tests.services.gateway.test_websocket_api import START, Player


def tensors(message: Message):
    """Every `Tensor` inside `message`, however deep (maps and repeated fields too)."""
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            items = list(value.values())
        elif field.is_repeated:
            items = list(value)
        else:
            items = [value]
        for item in items:
            if isinstance(item, stages_pb2.Tensor):
                yield item
            elif isinstance(item, Message):
                yield from tensors(item)


@pytest.mark.parametrize("mode", ["histream+", "self-forcing"])
def test_only_latents_and_once_per_prompt_the_text_context_cross(tmp_path, monkeypatch, mode):
    crossed: list[tuple[str, str, str, stages_pb2.Tensor]] = []
    call = fakes.Scripted._call

    async def recording(self, method, request, run):
        answer = await call(self, method, request, run)
        for message, way in ((request, "in"), (answer, "out")):
            if isinstance(message, Message):
                crossed.extend((self.name, method, way, t) for t in tensors(message))
        return answer

    monkeypatch.setattr(fakes.Scripted, "_call", recording)
    stages = real_stages(tmp_path)
    player = Player()
    with (
        gateway_client(settings_for(tmp_path), stages.handles) as (client, _),
        client.websocket_connect("/v1/sessions") as ws,
    ):
        ws.send_json({**START, "mode": mode})
        player.read(ws, "chunk", index=0)
        ws.send_json({"type": "prompt", "prompt": "a dog runs"})
        player.read(ws)
    assert player.events[-1] == {"type": "session.ended", "reason": "completed"}

    preset = settings_for(tmp_path).get_preset()
    text = [1, preset.dit.text_len, preset.dit.text_dim]
    high = [1, 16, 3, 64 // 8, 128 // 8]
    low = [1, 16, 3, 64 // 16, 128 // 16]  # DRC's low-res structure steps: half each side
    latent_shapes = [high, low] if mode == "histream+" else [high]
    for stage, method, way, tensor in crossed:
        assert list(tensor.shape) in [text, *latent_shapes], (stage, method, way, tensor.shape)
    contexts = [(stage, method) for stage, method, way, t in crossed if list(t.shape) == text]
    denoisers = ["structure", "refine"] if mode == "histream+" else ["refine"]
    # EncodePrompt answers each of the 2 prompts once; each denoiser gets each context once
    assert sorted(contexts) == sorted(
        [("structure", "EncodePrompt")] * 2
        + [(s, "OpenSession") for s in denoisers]
        + [(s, "SetPrompt") for s in denoisers]
    )
    largest = max(len(t.data) for *_, t in crossed)
    assert largest == 16 * 3 * 8 * 16 * 4  # a high-res chunk's latents in float32
