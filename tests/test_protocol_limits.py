"""Client event parsing: strict types, size limits, number ranges (server/protocol.py, README "Limits").

Pure parsing, no server: every case names the error code, the param and the event_id echoed.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from server.protocol import (
    BIG_FRAME_CHARS,
    MAX_AUDIO_CHARS,
    MAX_BIG_FRAME_VALUES,
    MAX_CONTENT_PARTS,
    MAX_EVENT_ID_CHARS,
    MAX_ID_CHARS,
    MAX_INSTRUCTIONS_CHARS,
    MAX_INTERRUPT_PHRASE_CHARS,
    MAX_INTERRUPT_PHRASES,
    MAX_JSON_DEPTH,
    MAX_JSON_INT,
    MAX_JSON_STRING_CHARS,
    MAX_METADATA_KEY_CHARS,
    MAX_METADATA_PAIRS,
    MAX_METADATA_VALUE_CHARS,
    MAX_MS,
    MAX_TEXT_CHARS,
    MAX_TOOL_NAME_CHARS,
    MAX_TOOLS,
    ItemTruncate,
    Playback,
    ProtocolError,
    SessionUpdate,
    error_event,
    parse_client_event,
)


def _error(message: str | dict[str, Any]) -> ProtocolError:
    text = message if isinstance(message, str) else json.dumps(message)
    with pytest.raises(ProtocolError) as info:
        parse_client_event(text)
    return info.value


def _session(**session: Any) -> dict[str, Any]:
    return {"type": "session.update", "event_id": "ev", "session": session}


def _response(**response: Any) -> dict[str, Any]:
    return {"type": "response.create", "event_id": "ev", "response": response}


def _item(**item: Any) -> dict[str, Any]:
    content = item.pop("content", [{"type": "input_text", "text": "hi"}])
    return {"type": "conversation.item.create", "event_id": "ev", "item": {"role": "user", "content": content, **item}}


def _x(n: int) -> str:
    return "x" * n


AT_LIMIT = [
    _session(instructions=_x(MAX_INSTRUCTIONS_CHARS)),
    _response(instructions=_x(MAX_INSTRUCTIONS_CHARS)),
    {"type": "input_audio_buffer.commit", "event_id": _x(MAX_EVENT_ID_CHARS)},
    _item(id=_x(MAX_ID_CHARS)),
    {**_item(), "previous_item_id": _x(MAX_ID_CHARS)},
    {"type": "conversation.item.retrieve", "item_id": _x(MAX_ID_CHARS)},
    {"type": "response.cancel", "response_id": _x(MAX_ID_CHARS)},
    _response(metadata={f"{i:0{MAX_METADATA_KEY_CHARS}d}": _x(MAX_METADATA_VALUE_CHARS)
                        for i in range(MAX_METADATA_PAIRS)}),
    _session(omnivox={"interrupt_phrases": ["stop " + _x(MAX_INTERRUPT_PHRASE_CHARS - 5)] * MAX_INTERRUPT_PHRASES}),
    _session(omnivox={"interrupt_phrases": ["Stop, Omni!", "don't", "7"]}),
    _item(content=[{"type": "input_text", "text": _x(MAX_TEXT_CHARS)}]),
    _item(role="assistant", content=[{"type": "output_audio", "transcript": _x(MAX_TEXT_CHARS)}]),
    _item(content=[{"type": "input_text", "text": "a"}] * MAX_CONTENT_PARTS),
    _session(tools=[{"type": "function", "name": _x(MAX_TOOL_NAME_CHARS), "description": _x(MAX_JSON_STRING_CHARS),
                     "parameters": {"type": "object"}}] * MAX_TOOLS),
    _session(tools=[{"name": "f", "parameters": json.loads('{"a":' * (MAX_JSON_DEPTH - 2) + "{}" +
                                                           "}" * (MAX_JSON_DEPTH - 2))}]),
    _session(tools=[{"type": "mcp", "server_label": "s", "server_url": "https://example.invalid",
                     "require_approval": {"never": {"tool_names": ["a"]}}, "allowed_tools": ["a"]}]),
    _session(tool_choice={"type": "function", "name": "f"}),
    _session(tool_choice={"type": "mcp", "server_label": "s"}),
    {"type": "omnivox.playback", "item_id": "x", "played_ms": MAX_MS},
    {"type": "conversation.item.truncate", "item_id": "x", "audio_end_ms": MAX_MS, "content_index": 15},
    {"type": "input_audio_buffer.commit", "unused": [MAX_JSON_INT, -MAX_JSON_INT, 1e308, -1e-400]},
]  # fmt: skip


@pytest.mark.parametrize("event", AT_LIMIT, ids=range(len(AT_LIMIT)))
def test_at_the_limits_events_parse(event: dict[str, Any]) -> None:
    parse_client_event(json.dumps(event))


OVER_LIMIT = [
    (_session(instructions=_x(MAX_INSTRUCTIONS_CHARS + 1)), "session.instructions"),
    (_response(instructions=_x(MAX_INSTRUCTIONS_CHARS + 1)), "response.instructions"),
    ({"type": "input_audio_buffer.commit", "event_id": _x(MAX_EVENT_ID_CHARS + 1)}, "event_id"),
    (_item(id=_x(MAX_ID_CHARS + 1)), "item.id"),
    (_item(id=""), "item.id"),
    ({**_item(), "previous_item_id": _x(MAX_ID_CHARS + 1)}, "previous_item_id"),
    ({"type": "conversation.item.retrieve", "event_id": "ev", "item_id": _x(MAX_ID_CHARS + 1)}, "item_id"),
    ({"type": "conversation.item.delete", "event_id": "ev", "item_id": _x(MAX_ID_CHARS + 1)}, "item_id"),
    ({"type": "conversation.item.truncate", "event_id": "ev", "item_id": _x(MAX_ID_CHARS + 1), "audio_end_ms": 1},
     "item_id"),
    ({"type": "response.cancel", "event_id": "ev", "response_id": _x(MAX_ID_CHARS + 1)}, "response_id"),
    ({"type": "omnivox.playback", "event_id": "ev", "item_id": _x(MAX_ID_CHARS + 1), "played_ms": 1}, "item_id"),
    (_response(input=[{"type": "item_reference", "id": _x(MAX_ID_CHARS + 1)}]), "response.input.0.id"),
    (_response(metadata={f"k{i}": "v" for i in range(MAX_METADATA_PAIRS + 1)}), "response.metadata"),
    (_response(metadata={_x(MAX_METADATA_KEY_CHARS + 1): "v"}), "response.metadata." + _x(64) + "..."),
    (_response(metadata={"k": _x(MAX_METADATA_VALUE_CHARS + 1)}), "response.metadata.k"),
    (_session(omnivox={"interrupt_phrases": ["stop"] * (MAX_INTERRUPT_PHRASES + 1)}),
     "session.omnivox.interrupt_phrases"),
    (_session(omnivox={"interrupt_phrases": [_x(MAX_INTERRUPT_PHRASE_CHARS + 1)]}),
     "session.omnivox.interrupt_phrases.0"),
    (_item(content=[{"type": "input_text", "text": _x(MAX_TEXT_CHARS + 1)}]), "item.content.0.text"),
    (_item(role="assistant", content=[{"type": "output_audio", "transcript": _x(MAX_TEXT_CHARS + 1)}]),
     "item.content.0.transcript"),
    (_item(content=[{"type": "input_text", "text": "a"}] * (MAX_CONTENT_PARTS + 1)), "item.content"),
    (_session(tools=[{"name": "f"}] * (MAX_TOOLS + 1)), "session.tools"),
    (_session(tools=[{"name": _x(MAX_TOOL_NAME_CHARS + 1)}]), "session.tools.0"),
    (_session(tools=[{"name": "f", "description": _x(MAX_JSON_STRING_CHARS + 1)}]), "session.tools.0"),
    (_session(tools=[{"name": "f", "parameters": json.loads('{"a":' * (MAX_JSON_DEPTH - 1) + "{}" +
                                                            "}" * (MAX_JSON_DEPTH - 1))}]), "session.tools.0"),
    (_session(tools=[{"type": "retrieval"}]), "session.tools.0"),
    (_session(tools=[{"type": "mcp"}]), "session.tools.0"),
    (_session(tools=[{"type": "mcp", "server_label": "s", "headers": {"a": 1}}]), "session.tools.0"),
    (_session(tool_choice={"type": "function"}), "session.tool_choice"),
    (_session(tool_choice={"anything": [1]}), "session.tool_choice"),
    (_session(tool_choice="sometimes"), "session.tool_choice"),
    (_item(content=[{"type": "input_image", "detail": "ultra"}]), "item.content.0.detail"),
    ({"type": "omnivox.playback", "event_id": "ev", "item_id": "x", "played_ms": MAX_MS + 1}, "played_ms"),
    ({"type": "omnivox.playback", "event_id": "ev", "item_id": "x", "played_ms": -1}, "played_ms"),
    ({"type": "conversation.item.truncate", "event_id": "ev", "item_id": "x", "audio_end_ms": MAX_MS + 1},
     "audio_end_ms"),
    ({"type": "conversation.item.truncate", "event_id": "ev", "item_id": "x", "audio_end_ms": 1,
      "content_index": MAX_CONTENT_PARTS}, "content_index"),
    (_session(max_output_tokens=4097), "session.max_output_tokens"),
    (_session(max_output_tokens="infinite"), "session.max_output_tokens"),
]  # fmt: skip


@pytest.mark.parametrize(("event", "param"), OVER_LIMIT, ids=range(len(OVER_LIMIT)))
def test_over_a_limit_is_invalid_event_naming_the_field(event: dict[str, Any], param: str) -> None:
    err = _error(event)
    assert (err.code, err.param) == ("invalid_event", param), err.message
    assert err.event_id == (event.get("event_id") if len(event.get("event_id", "")) <= MAX_EVENT_ID_CHARS else None)


@pytest.mark.parametrize("phrase", ["!!!", "\U0001f642", "   ", "", "'", "\u00e9\u00e8", "..."])
def test_interrupt_phrases_that_normalize_to_nothing_are_refused(phrase: str) -> None:
    err = _error(_session(omnivox={"interrupt_phrases": ["stop", phrase]}))
    assert (err.code, err.param) == ("invalid_event", "session.omnivox.interrupt_phrases.1")


WRONG_TYPES = [
    ({"type": "omnivox.playback", "item_id": "x", "played_ms": True}, "played_ms"),
    ({"type": "omnivox.playback", "item_id": "x", "played_ms": "5"}, "played_ms"),
    ({"type": "omnivox.playback", "item_id": "x", "played_ms": 5.5}, "played_ms"),
    ({"type": "omnivox.playback", "item_id": 5, "played_ms": 5}, "item_id"),
    ({"type": "omnivox.playback", "played_ms": 5}, "item_id"),
    (_session(omnivox={"binary_audio": 1}), "session.omnivox.binary_audio"),
    (_session(omnivox={"binary_audio": "true"}), "session.omnivox.binary_audio"),
    (_session(max_output_tokens=True), "session.max_output_tokens"),
    (_session(max_output_tokens=8.5), "session.max_output_tokens"),
    (_session(instructions=5), "session.instructions"),
    (_session(output_modalities="audio"), "session.output_modalities"),
    (_session(audio={"input": {"turn_detection": {"type": "server_vad", "threshold": "0.5"}}}),
     "session.audio.input.turn_detection.threshold"),
    (_session(audio={"input": {"turn_detection": {"type": "semantic_vad", "create_response": 0}}}),
     "session.audio.input.turn_detection.create_response"),
    (_session(audio={"input": {"format": {"type": "audio/pcm", "rate": "24000"}}}), "session.audio.input.format.rate"),
    (_session(audio={"output": {"speed": None, "voice": ["alloy"]}}), "session.audio.output.voice"),
    ({"type": "input_audio_buffer.append", "audio": None}, "audio"),
    ({"type": "input_audio_buffer.append", "audio": ["AAAA"]}, "audio"),
    (_response(metadata={"k": 1}), "response.metadata.k"),
    (_response(input=[{"type": "message", "role": "user", "content": [{"type": "input_text", "text": 1}]}]),
     "response.input.0.content.0.text"),
    ({"type": "session.update", "session": None}, "session"),
]  # fmt: skip


@pytest.mark.parametrize(("event", "param"), WRONG_TYPES, ids=range(len(WRONG_TYPES)))
def test_wrong_types_are_refused_not_coerced(event: dict[str, Any], param: str) -> None:
    err = _error(event)
    assert (err.code, err.param) == ("invalid_event", param), err.message


def test_integral_numbers_are_integers() -> None:
    ev = parse_client_event('{"type": "omnivox.playback", "item_id": "x", "played_ms": 250.0}')
    assert isinstance(ev, Playback) and ev.played_ms == 250 and type(ev.played_ms) is int
    ev = parse_client_event('{"type": "conversation.item.truncate", "item_id": "x", "audio_end_ms": 1e3}')
    assert isinstance(ev, ItemTruncate) and ev.audio_end_ms == 1000
    ev = parse_client_event(json.dumps(_session(audio={"input": {"format": {"type": "audio/pcm", "rate": 16000.0}}})))
    assert isinstance(ev, SessionUpdate)
    assert ev.session.audio and ev.session.audio.input and ev.session.audio.input.format
    assert ev.session.audio.input.format.sample_rate == 16000


@pytest.mark.parametrize(
    ("text", "param"),
    [
        ('{"type": "omnivox.playback", "item_id": "x", "played_ms": ' + "9" * 5000 + ', "event_id": "ev"}',
         "played_ms"),
        ('{"type": "omnivox.playback", "item_id": "x", "played_ms": 1e400, "event_id": "ev"}', "played_ms"),
        ('{"type": "omnivox.playback", "item_id": "x", "played_ms": ' + str(MAX_JSON_INT + 1) + ', "event_id": "ev"}',
         "played_ms"),
        ('{"type": "session.update", "event_id": "ev", "session": {"audio": {"output": {"speed": -1e999}}}}',
         "session.audio.output.speed"),
        ('{"type": "input_audio_buffer.commit", "event_id": "ev", "extra": [0, {"deep": ' + "1" * 40 + "}]}",
         "extra.1.deep"),
        ('{"type": "input_audio_buffer.commit", "event_id": "ev", "x": ' + "-" + "9" * 100_000 + "}", "x"),
        ('{"type": "session.update", "event_id": "ev", "session": {"tools": [{"name": "f", "parameters": '
         '{"maximum": 1e309}}]}}', "session.tools.0.parameters.maximum"),
    ],
)  # fmt: skip
def test_numbers_out_of_range_anywhere_are_invalid_event(text: str, param: str) -> None:
    err = _error(text)
    assert (err.code, err.param, err.event_id) == ("invalid_event", param, "ev"), err.message
    assert len(err.message) < 400


@pytest.mark.parametrize(
    "text",
    [
        "[" * 5000 + "]" * 5000,
        '{"a":' * 5000 + "1" + "}" * 5000,
        '{"type": "omnivox.playback", "item_id": "x", "played_ms": NaN, "event_id": "ev"}',
        '{"type": "omnivox.playback", "item_id": "x", "played_ms": -Infinity}',
        "[1, 2]",
        '"input_audio_buffer.commit"',
        "",
        '{"type": "input_audio_buffer.commit"',
        b'{"type": "input_audio_buffer.commit", "x": "\xff\xfe"}',
    ],
)  # fmt: skip
def test_not_a_json_object_is_invalid_json(text: str | bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_client_event(text)
    err = info.value
    assert err.code == "invalid_json" and err.event_id is None


def test_lone_surrogates_are_refused_and_never_echoed() -> None:
    err = _error('{"type": "session.update", "event_id": "ev", "session": {"instructions": "a\\ud800b"}}')
    assert (err.code, err.param, err.event_id) == ("invalid_event", "session.instructions", "ev")
    err = _error('{"type": "input_audio_buffer.commit", "event_id": "a\\udc00"}')
    assert (err.param, err.event_id) == ("event_id", None)
    err = _error('{"type": "nope\\ud800", "event_id": "ev"}')
    assert err.code == "unknown_event" and err.message.encode("utf-8")  # printable: no surrogate left
    err = _error('{"type": "session.update", "session": {"tools": [{"name": "f", "description": "\\udfff"}]}}')
    assert err.param == "session.tools.0" and err.message.encode("utf-8")


def test_an_over_long_event_id_is_not_echoed() -> None:
    err = _error({"type": "nope", "event_id": _x(MAX_EVENT_ID_CHARS + 1)})
    assert err.code == "unknown_event" and err.event_id is None


def test_audio_and_images_have_limits() -> None:
    err = _error({"type": "input_audio_buffer.append", "event_id": "ev", "audio": "A" * (MAX_AUDIO_CHARS + 4)})
    assert (err.code, err.param) == ("invalid_event", "audio")


def test_params_name_the_json_path_without_union_tags() -> None:
    err = _error(_session(audio={"input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 5}}}))
    assert err.param == "session.audio.input.turn_detection.silence_duration_ms"
    err = _error(_response(input=[{"type": "message", "role": "user", "content": [{"type": "input_audio",
                                                                                   "audio": 5}]}]))  # fmt: skip
    assert err.param == "response.input.0.content.0.audio"
    err = _error(_session(max_output_tokens=0))
    assert err.param == "session.max_output_tokens"


def test_error_events_have_openais_shape() -> None:
    from .openai_events import check_server_event

    err = _error({"type": "omnivox.playback", "event_id": "ev", "item_id": "x", "played_ms": -1})
    event = error_event(err, "event_1")
    check_server_event(event, extensions=False)
    assert event["error"] == {"type": "invalid_request_error", "code": "invalid_event", "message": err.message,
                              "param": "played_ms", "event_id": "ev"}  # fmt: skip
    internal = error_event(ProtocolError("server_error", "internal error", error_type="server_error"), "event_2")
    check_server_event(internal, extensions=False)
    assert internal["error"]["type"] == "server_error"


def test_a_big_frame_may_hold_only_a_few_values() -> None:
    junk = json.dumps({"type": "input_audio_buffer.commit", "event_id": "ev", "x": [[1]] * (BIG_FRAME_CHARS // 4)})
    err = _error(junk)
    assert err.code == "invalid_event" and str(MAX_BIG_FRAME_VALUES) in err.message
    # Below the size it parses (the values are ignored), and big audio is a handful of values.
    parse_client_event(json.dumps({"type": "input_audio_buffer.commit", "x": [[1]] * (BIG_FRAME_CHARS // 8)}))
    parse_client_event(json.dumps({"type": "input_audio_buffer.append", "audio": "A" * (4 * BIG_FRAME_CHARS)}))
