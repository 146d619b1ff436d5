"""Every server event checked against the official `openai` package's realtime event types."""

from __future__ import annotations

import copy
import typing
from typing import Any

from openai.types.realtime import RealtimeServerEvent
from pydantic import BaseModel


def _event_models() -> dict[str, type[BaseModel]]:
    union = typing.get_args(RealtimeServerEvent)[0]  # Annotated[Union[...], discriminator]
    models: dict[str, type[BaseModel]] = {}
    for model in typing.get_args(union):
        (name,) = typing.get_args(model.model_fields["type"].annotation)
        models[name] = model
    return models


EVENT_MODELS = _event_models()


def check_server_event(event: dict[str, Any], extensions: bool) -> None:
    """Raise AssertionError unless `event` is a valid OpenAI realtime server event, or an
    `omnivox.*` event sent to a client that asked for extensions."""
    kind = event.get("type")
    assert isinstance(kind, str), f"event without a type: {event}"
    if kind.startswith("omnivox."):
        assert extensions, f"{kind} sent to a client that did not ask for omnivox extensions"
        return
    model = EVENT_MODELS.get(kind)
    assert model is not None, f"{kind} is not an OpenAI realtime server event"
    if kind in ("session.created", "session.updated"):
        fmt = event["session"]["audio"]["input"]["format"]
        if fmt.get("rate") == 16000:  # our documented extension (OpenAI's pcm is 24 kHz only): checked as 24 kHz
            event = copy.deepcopy(event)
            event["session"]["audio"]["input"]["format"]["rate"] = 24000
    try:
        model.model_validate(event)
    except Exception as e:
        raise AssertionError(f"{kind} is not valid against openai's {model.__name__}: {e}\n{event}") from None
    if not extensions and kind == "response.done":
        assert "omnivox" not in event["response"], "response.omnivox sent to a client that did not ask"
