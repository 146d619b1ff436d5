"""Fuzzing the realtime server: 4 concurrent sessions, over 10,000 bad (and some good) client
events, and a real push-to-talk turn every ~200 events per session.

Every bad event must be answered by an `error` event (tracked by event_id where the event
carries a valid one, counted otherwise), every turn by a `response.done`, every server event
must be valid against openai's types, and no session may be closed. The events come from a
seeded `random.Random`: the seed is printed, and OMNIVOX_FUZZ_SEED=N reruns a failure.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import copy
import json
import os
import random
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soxr
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from server.protocol import (
    BIG_FRAME_CHARS,
    MAX_AUDIO_CHARS,
    MAX_CONTENT_PARTS,
    MAX_EVENT_ID_CHARS,
    MAX_ID_CHARS,
    MAX_INSTRUCTIONS_CHARS,
    MAX_INTERRUPT_PHRASE_CHARS,
    MAX_INTERRUPT_PHRASES,
    MAX_JSON_DEPTH,
    MAX_JSON_INT,
    MAX_METADATA_KEY_CHARS,
    MAX_METADATA_PAIRS,
    MAX_METADATA_VALUE_CHARS,
    MAX_MS,
    MAX_TEXT_CHARS,
    MAX_TOOLS,
    MAX_TRANSCRIPTION_PROMPT_CHARS,
    MAX_VOICE_CHARS,
    ProtocolError,
    parse_client_event,
)
from server.settings import ServerSettings

from .conftest import fixture_audio
from .openai_events import check_server_event
from .test_server import Running, start_server, stop_server

SEED = int(os.environ.get("OMNIVOX_FUZZ_SEED", "20260513"))
SESSIONS = 4
EVENTS_PER_SESSION = 2500  # fuzz events; the turns' own events come on top
TURN_EVERY = 200
TURN_TIMEOUT_S = 30.0
WINDOW = 256  # at most this many bad events sent and not yet answered (the server's send buffer is 512)
TEST_TIMEOUT_S = 240.0  # the whole run; expected well under 60 s

BAD_INPUT_CODES = {"invalid_json", "invalid_event", "unknown_event", "invalid_audio"}
KINDS = ("null", "bool", "int", "float", "str", "list", "obj")
NUM = "\x00NUM\x00"  # placeholder replaced by a raw number literal after json.dumps


@pytest.fixture(scope="module")
def server(tiny_ckpt: Path) -> Iterator[Running]:
    r = start_server(ServerSettings(port=0, checkpoint_dir=tiny_ckpt, max_sessions=SESSIONS, max_new_tokens=16,
                                    interrupt_detector=False, turn_model=False, log_level="error"))  # fmt: skip
    yield r
    stop_server(r)


# ---------------- what is sent ----------------

TURN_DETECTION = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500,
                  "idle_timeout_ms": None, "create_response": True, "interrupt_response": True}  # fmt: skip
BASES: dict[str, dict[str, Any]] = {
    "session.update": {"session": {
        "type": "realtime", "instructions": "be brief", "output_modalities": ["audio"],
        "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": TURN_DETECTION,
                            "transcription": {"model": "whisper-1", "language": "en", "prompt": "hi"},
                            "noise_reduction": {"type": "near_field"}},
                  "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "alloy", "speed": 1.0}},
        "tools": [{"type": "function", "name": "f", "description": "d", "parameters": {"type": "object"}}],
        "tool_choice": "auto", "max_output_tokens": 64,
        "omnivox": {"interrupt_mode": "command", "interrupt_phrases": ["stop"], "binary_audio": False,
                    "max_audio_lead_ms": 1000, "first_chunk_lookahead_frames": 1}}},
    "input_audio_buffer.append": {"audio": "AAAA"},
    "input_audio_buffer.commit": {},
    "input_audio_buffer.clear": {},
    "conversation.item.create": {"previous_item_id": None, "item": {
        "id": "item_x", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}},
    "conversation.item.retrieve": {"item_id": "nope"},
    "conversation.item.delete": {"item_id": "nope"},
    "conversation.item.truncate": {"item_id": "nope", "content_index": 0, "audio_end_ms": 10},
    "response.create": {"response": {
        "output_modalities": ["text"], "instructions": "hi", "metadata": {"k": "v"}, "conversation": "none",
        "input": [{"type": "item_reference", "id": "nope"}], "max_output_tokens": 8, "tool_choice": "auto",
        "tools": []}},
    "response.cancel": {"response_id": "resp_nope"},
    "omnivox.playback": {"item_id": "nope", "played_ms": 5},
}  # fmt: skip

S, N = {"str"}, {"null"}
NUMBER = {"int", "float"}
ALL_EVENTS = ((("type",), S), (("event_id",), S | N))
# (path, JSON kinds the field takes): a value of any other kind makes the event invalid.
FIELDS: dict[str, list[tuple[tuple[Any, ...], set[str]]]] = {
    "session.update": [
        (("session",), {"obj"}), (("session", "type"), S), (("session", "instructions"), S | N),
        (("session", "output_modalities"), {"list"} | N), (("session", "output_modalities", 0), S),
        (("session", "audio"), {"obj"} | N), (("session", "audio", "input"), {"obj"} | N),
        (("session", "audio", "input", "format"), {"obj"} | N), (("session", "audio", "input", "format", "type"), S),
        (("session", "audio", "input", "format", "rate"), {"int"} | N),
        (("session", "audio", "input", "turn_detection"), {"obj"} | N),
        (("session", "audio", "input", "turn_detection", "type"), S),
        (("session", "audio", "input", "turn_detection", "threshold"), NUMBER),
        (("session", "audio", "input", "turn_detection", "prefix_padding_ms"), {"int"}),
        (("session", "audio", "input", "turn_detection", "silence_duration_ms"), {"int"}),
        (("session", "audio", "input", "turn_detection", "idle_timeout_ms"), {"int"} | N),
        (("session", "audio", "input", "turn_detection", "create_response"), {"bool"}),
        (("session", "audio", "input", "turn_detection", "interrupt_response"), {"bool"}),
        (("session", "audio", "input", "transcription"), {"obj"} | N),
        (("session", "audio", "input", "transcription", "model"), S | N),
        (("session", "audio", "input", "transcription", "language"), S | N),
        (("session", "audio", "input", "transcription", "prompt"), S | N),
        (("session", "audio", "input", "noise_reduction"), {"obj"} | N),
        (("session", "audio", "input", "noise_reduction", "type"), S),
        (("session", "audio", "output"), {"obj"} | N), (("session", "audio", "output", "format"), {"obj"} | N),
        (("session", "audio", "output", "voice"), S | N), (("session", "audio", "output", "speed"), NUMBER | N),
        (("session", "tools"), {"list"} | N), (("session", "tools", 0), {"obj"}), (("session", "tools", 0, "name"), S),
        (("session", "tools", 0, "description"), S | N), (("session", "tools", 0, "parameters"), {"obj"} | N),
        (("session", "tool_choice"), S | {"obj"} | N), (("session", "max_output_tokens"), {"int"} | S | N),
        (("session", "omnivox"), {"obj"} | N), (("session", "omnivox", "interrupt_mode"), S | N),
        (("session", "omnivox", "interrupt_phrases"), {"list"} | N),
        (("session", "omnivox", "interrupt_phrases", 0), S),
        (("session", "omnivox", "binary_audio"), {"bool"} | N),
        (("session", "omnivox", "max_audio_lead_ms"), {"int"} | N),
        (("session", "omnivox", "first_chunk_lookahead_frames"), {"int"} | N),
    ],
    "input_audio_buffer.append": [(("audio",), S)],
    "input_audio_buffer.commit": [],
    "input_audio_buffer.clear": [],
    "conversation.item.create": [
        (("item",), {"obj"}), (("item", "id"), S | N), (("item", "type"), S), (("item", "role"), S),
        (("item", "content"), {"list"}), (("item", "content", 0), {"obj"}), (("item", "content", 0, "type"), S),
        (("item", "content", 0, "text"), S | N), (("previous_item_id",), S | N),
    ],
    "conversation.item.retrieve": [(("item_id",), S)],
    "conversation.item.delete": [(("item_id",), S)],
    "conversation.item.truncate": [(("item_id",), S), (("content_index",), {"int"}), (("audio_end_ms",), {"int"})],
    "response.create": [
        (("response",), {"obj"} | N), (("response", "output_modalities"), {"list"} | N),
        (("response", "output_modalities", 0), S), (("response", "instructions"), S | N),
        (("response", "metadata"), {"obj"} | N), (("response", "metadata", "k"), S),
        (("response", "conversation"), S | N), (("response", "input"), {"list"} | N),
        (("response", "input", 0), {"obj"}), (("response", "input", 0, "type"), S),
        (("response", "input", 0, "id"), S), (("response", "max_output_tokens"), {"int"} | S | N),
        (("response", "tool_choice"), S | {"obj"} | N), (("response", "tools"), {"list"} | N),
    ],
    "response.cancel": [(("response_id",), S | N)],
    "omnivox.playback": [(("item_id",), S), (("played_ms",), {"int"})],
}  # fmt: skip
for _fields in FIELDS.values():
    _fields.extend(ALL_EVENTS)


def _long(n: int) -> str:
    return "x" * n


def _raw_number(rng: random.Random) -> str:
    """A number literal outside the limits, as text."""
    return rng.choice([
        "1e400", "-1e400", "9" * rng.randint(400, 5000), str(MAX_JSON_INT + 1), str(-MAX_JSON_INT - 1),
        "1" + "0" * 30, "2.5e308",
    ])  # fmt: skip


# Values that are the right JSON kind but break a limit or a rule.
BAD_VALUES: dict[tuple[str, tuple[Any, ...]], Any] = {
    ("session.update", ("session", "type")): "transcription",
    ("session.update", ("session", "instructions")): lambda r: _long(MAX_INSTRUCTIONS_CHARS + r.randint(1, 50)),
    ("session.update", ("session", "output_modalities")): ["audio", "text"],
    ("session.update", ("session", "output_modalities", 0)): "video",
    ("session.update", ("session", "audio", "input", "format", "type")): "audio/mp3",
    ("session.update", ("session", "audio", "input", "format", "rate")): 44100,
    ("session.update", ("session", "audio", "input", "turn_detection", "type")): "client_vad",
    ("session.update", ("session", "audio", "input", "turn_detection", "threshold")):
        lambda r: r.choice([0, 1, 1.5, -0.1]),
    ("session.update", ("session", "audio", "input", "turn_detection", "prefix_padding_ms")): 5001,
    ("session.update", ("session", "audio", "input", "turn_detection", "silence_duration_ms")): 31,
    ("session.update", ("session", "audio", "input", "turn_detection", "idle_timeout_ms")): 4999,
    ("session.update", ("session", "audio", "input", "transcription", "prompt")):
        _long(MAX_TRANSCRIPTION_PROMPT_CHARS + 1),
    ("session.update", ("session", "audio", "input", "noise_reduction", "type")): "none",
    ("session.update", ("session", "audio", "output", "voice")): _long(MAX_VOICE_CHARS + 1),
    ("session.update", ("session", "audio", "output", "speed")): lambda r: r.choice([0.1, 2, 1.51]),
    ("session.update", ("session", "tools")): lambda r: [{"name": f"f{i}"} for i in range(MAX_TOOLS + 1)],
    ("session.update", ("session", "tools", 0)): lambda r: r.choice([{"type": "bogus"}, {"name": ""}, {}]),
    ("session.update", ("session", "tools", 0, "parameters")):
        lambda r: json.loads('{"a":' * (MAX_JSON_DEPTH + 2) + "1" + "}" * (MAX_JSON_DEPTH + 2)),
    ("session.update", ("session", "tool_choice")): lambda r: r.choice(["bogus", {"type": "function"}, {"a": 1}]),
    ("session.update", ("session", "max_output_tokens")): lambda r: r.choice([0, 4097, "bogus", -1]),
    ("session.update", ("session", "omnivox", "interrupt_mode")): "always",
    ("session.update", ("session", "omnivox", "interrupt_phrases")):
        lambda r: r.choice([["stop"] * (MAX_INTERRUPT_PHRASES + 1), ["stop", "!!!"], [""]]),
    ("session.update", ("session", "omnivox", "interrupt_phrases", 0)):
        lambda r: r.choice(["!!!", "\U0001f642", "   ", "'", _long(MAX_INTERRUPT_PHRASE_CHARS + 1), "\u00e9\u00e8"]),
    ("session.update", ("session", "omnivox", "max_audio_lead_ms")): 99,
    ("session.update", ("session", "omnivox", "first_chunk_lookahead_frames")): 4,
    ("input_audio_buffer.append", ("audio",)): lambda r: r.choice([
        "!!!", "a", "abc", "ab=c", "AAA", "\u00e9\u00e9\u00e9\u00e9", base64.b64encode(r.randbytes(3)).decode(),
        "A" * (MAX_AUDIO_CHARS + 4) if r.random() < 0.02 else "****"]),
    ("conversation.item.create", ("item", "id")): lambda r: r.choice(["", _long(MAX_ID_CHARS + 1)]),
    ("conversation.item.create", ("item", "type")): "function_call",
    ("conversation.item.create", ("item", "role")): "tool",
    ("conversation.item.create", ("item", "content")): lambda r: r.choice(
        [[], [{"type": "input_text", "text": "a"}] * (MAX_CONTENT_PARTS + 1)]),
    ("conversation.item.create", ("item", "content", 0, "type")): lambda r: r.choice(["output_text", "video"]),
    ("conversation.item.create", ("item", "content", 0, "text")): lambda r: _long(MAX_TEXT_CHARS + 1),
    ("conversation.item.create", ("previous_item_id",)): _long(MAX_ID_CHARS + 1),
    ("conversation.item.retrieve", ("item_id",)): _long(MAX_ID_CHARS + 1),
    ("conversation.item.delete", ("item_id",)): _long(MAX_ID_CHARS + 1),
    ("conversation.item.truncate", ("item_id",)): _long(MAX_ID_CHARS + 1),
    ("conversation.item.truncate", ("content_index",)): lambda r: r.choice([-1, MAX_CONTENT_PARTS]),
    ("conversation.item.truncate", ("audio_end_ms",)): lambda r: r.choice([-1, MAX_MS + 1]),
    ("response.create", ("response", "output_modalities", 0)): "video",
    ("response.create", ("response", "instructions")): _long(MAX_INSTRUCTIONS_CHARS + 1),
    ("response.create", ("response", "metadata")): lambda r: r.choice([
        {f"k{i}": "v" for i in range(MAX_METADATA_PAIRS + 1)}, {_long(MAX_METADATA_KEY_CHARS + 1): "v"}]),
    ("response.create", ("response", "metadata", "k")): _long(MAX_METADATA_VALUE_CHARS + 1),
    ("response.create", ("response", "conversation")): "other",
    ("response.create", ("response", "input", 0, "type")): "function_call_output",
    ("response.create", ("response", "input", 0, "id")): _long(MAX_ID_CHARS + 1),
    ("response.create", ("response", "max_output_tokens")): lambda r: r.choice([0, 4097, "infinite"]),
    ("response.cancel", ("response_id",)): _long(MAX_ID_CHARS + 1),
    ("omnivox.playback", ("item_id",)): _long(MAX_ID_CHARS + 1),
    ("omnivox.playback", ("played_ms",)): lambda r: r.choice([-1, MAX_MS + 1]),
}  # fmt: skip
NUMERIC = {(kind, path) for kind, fields in FIELDS.items() for path, kinds in fields if kinds & NUMBER}


def rand_text(rng: random.Random, n: int | None = None) -> str:
    n = rng.randint(0, 12) if n is None else n
    alphabet = "abcXYZ09 _-.!?'\"\\/\n\t\u00e9\u4e2d\U0001f642\u0000"
    return "".join(rng.choice(alphabet) for _ in range(n))


def rand_value(rng: random.Random, kind: str | None = None, depth: int = 0) -> Any:
    kind = kind or rng.choice(KINDS if depth < 3 else KINDS[:5])
    if kind == "null":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.choice([0, 1, -1, rng.randint(-(2**31), 2**31), rng.randint(-MAX_JSON_INT, MAX_JSON_INT)])
    if kind == "float":
        x = rng.uniform(-1e6, 1e6)
        return x + 0.25 if x.is_integer() else x  # an integral float is an int to a JSON reader
    if kind == "str":
        return rand_text(rng)
    if kind == "list":
        return [rand_value(rng, None, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rand_text(rng, rng.randint(0, 6)): rand_value(rng, None, depth + 1) for _ in range(rng.randint(0, 3))}


def _set(event: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    node: Any = event
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value


@dataclass
class Sent:
    payload: str | bytes
    expect: str  # "id": an error with this event_id; "anon": an error (no usable event_id); "none"
    event_id: str | None = None
    what: str = ""


def _dump(event: dict[str, Any], raw_number: str | None = None) -> str:
    text = json.dumps(event)
    if raw_number is not None:
        text = text.replace(json.dumps(NUM), raw_number)
    return text


def _tracked(event: dict[str, Any], eid: str, what: str, raw_number: str | None = None) -> Sent:
    """A bad event: answered under our event_id unless the mutation broke the event_id itself."""
    ok_id = event.get("event_id") == eid
    return Sent(_dump(event, raw_number), "id" if ok_id else "anon", eid if ok_id else None, what)


def make_event(rng: random.Random, eid: str) -> Sent:
    r = rng.random()
    kind = rng.choice(sorted(BASES))
    event: dict[str, Any] = {"type": kind, "event_id": eid, **copy.deepcopy(BASES[kind])}
    if r < 0.34:  # one field of a valid event with a value of a kind it does not take
        path, kinds = rng.choice(FIELDS[kind])
        wrong = rng.choice([k for k in KINDS if k not in kinds])
        _set(event, path, rand_value(rng, wrong))
        return _tracked(event, eid, f"wrong kind {wrong} at {kind}:{'.'.join(map(str, path))}")
    if r < 0.50:  # the right kind, but over a limit or against a rule
        key = rng.choice(sorted((k for k in BAD_VALUES if k[0] == kind), key=str) or sorted(BAD_VALUES, key=str))
        kind, path = key
        event = {"type": kind, "event_id": eid, **copy.deepcopy(BASES[kind])}
        bad = BAD_VALUES[key]
        _set(event, path, bad(rng) if callable(bad) else bad)
        return _tracked(event, eid, f"bad value at {kind}:{'.'.join(map(str, path))}")
    if r < 0.58:  # a number out of range, as a literal: in a numeric field, or in a field nobody reads
        numeric = sorted((k, p) for k, p in NUMERIC if k == kind)
        if numeric and rng.random() < 0.7:
            _, path = rng.choice(numeric)
            _set(event, path, NUM)
        else:
            event[rand_text(rng, 5) + "_extra"] = [NUM] if rng.random() < 0.5 else {"deep": [[NUM]]}
        return _tracked(event, eid, "number out of range", _raw_number(rng))
    if r < 0.62:  # the event_id itself broken: answered without an event_id
        event["event_id"] = rng.choice([_long(MAX_EVENT_ID_CHARS + 1), "\ud800" + eid, 5, ["x"], {"a": 1}, True])
        return Sent(_dump(event), "anon", None, "bad event_id")
    if r < 0.70:  # lone surrogates in a string field
        path, kinds = rng.choice([f for f in FIELDS[kind] if "str" in f[1] and f[0] != ("event_id",)] or [(("x",), S)])
        if path == ("x",):
            kind = "omnivox.playback"
            event = {"type": kind, "event_id": eid, **copy.deepcopy(BASES[kind])}
            path = ("item_id",)
        _set(event, path, "a\udc80b")
        return _tracked(event, eid, f"lone surrogate at {kind}:{'.'.join(map(str, path))}")
    if r < 0.80:  # a known type with random fields: bad or not, as the parser sees it
        kind = rng.choice(sorted(set(BASES) - {"response.create"}))  # a random valid one would start a response
        fields = {rng.choice(["audio", "session", "item", "response", "item_id", "audio_end_ms", "content_index",
                              "played_ms", "response_id", "previous_item_id", rand_text(rng, 4)]):
                  rand_value(rng) for _ in range(rng.randint(0, 4))}  # fmt: skip
        event = {**fields, "type": kind, "event_id": eid}
        text = json.dumps(event)
        try:
            parse_client_event(text)
        except ProtocolError:
            return Sent(text, "id", eid, "random fields")
        return Sent(text, "none", None, "random fields (valid)")
    if r < 0.83:  # unknown event types
        event["type"] = rng.choice(["nope", "session.create", "response.done", "", rand_text(rng, 30)])
        return _tracked(event, eid, "unknown type")
    if r < 0.88:  # not JSON, not an object, NaN/Infinity, too deep
        text = rng.choice([
            "{not json", '{"type": "input_audio_buffer.clear"', "", "[1, 2]", "5", '"str"', "null",
            '{"type": "omnivox.playback", "item_id": "x", "played_ms": NaN}',
            '{"type": "session.update", "session": {"omnivox": {"max_audio_lead_ms": Infinity}}}',
            "[" * 5000 + "]" * 5000, '{"a":' * 5000 + "1" + "}" * 5000, '{"type": "x", "a": ' + "[" * 3000,
            json.dumps(event)[: rng.randint(1, 40)],
        ])  # fmt: skip
        return Sent(text, "anon", None, "not a JSON object")
    if r < 0.94:  # binary frames while binary audio is off (random bytes: mostly not UTF-8)
        return Sent(rng.randbytes(rng.randint(0, 600)), "anon", None, "binary frame")
    if r < 0.945:  # a huge string
        huge = _long(rng.randint(1, 3) * 1024 * 1024)
        event = rng.choice([
            {"type": "session.update", "event_id": eid, "session": {"instructions": huge}},
            {"type": "input_audio_buffer.append", "event_id": eid, "audio": huge + "!"},
            {"type": "conversation.item.retrieve", "event_id": eid, "item_id": huge},
        ])  # fmt: skip
        if rng.random() < 0.3:  # a big frame of many small values: refused before it is parsed
            return Sent(json.dumps({**event, "x": [[0]] * (BIG_FRAME_CHARS // 4)}), "anon", None, "big structure")
        return _tracked(event, eid, "huge string")
    # valid events that change nothing that matters
    event = rng.choice([
        {"type": "input_audio_buffer.clear"},
        {"type": "session.update", "session": {"instructions": rand_text(rng, 20)}},
        {"type": "omnivox.playback", "item_id": "nope", "played_ms": rng.randint(0, 10_000)},
        {"type": "input_audio_buffer.append", "audio": base64.b64encode(bytes(rng.randrange(0, 200, 2))).decode()},
    ])  # fmt: skip
    return Sent(json.dumps(event), "none", None, "valid")


# ---------------- one session ----------------


@dataclass
class Stats:
    sent: int = 0
    expect_id: set[str] = field(default_factory=set)
    what: dict[str, str] = field(default_factory=dict)
    expect_anon: int = 0
    errors: int = 0
    error_ids: set[str] = field(default_factory=set)
    anon_errors: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    received: int = 0
    turns: int = 0
    turns_done: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    bad_server_events: list[str] = field(default_factory=list)
    closed: str | None = None
    recent: deque[tuple[int, str]] = field(default_factory=lambda: deque(maxlen=2 * WINDOW))  # the last sent


SETUP = {"type": "session.update", "session": {
    "type": "realtime", "output_modalities": ["audio"], "max_output_tokens": 16,
    "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": None}},
    "omnivox": {"binary_audio": False}}}  # fmt: skip


async def _reader(ws: ClientConnection, st: Stats, done: asyncio.Queue[dict[str, Any]], wake: asyncio.Event) -> None:
    try:
        async for msg in ws:
            st.received += 1
            if isinstance(msg, bytes):
                st.bad_server_events.append("a binary frame while binary audio is off")
                continue
            ev = json.loads(msg)
            try:
                check_server_event(ev, extensions=True)  # every client here asked for omnivox extensions
            except AssertionError as e:
                st.bad_server_events.append(str(e)[:500])
            if ev["type"] == "error":
                st.errors += 1
                err = ev["error"]
                st.codes[err["code"]] = st.codes.get(err["code"], 0) + 1
                if err["event_id"] is None:
                    # Errors about no client event (e.g. a commit of fuzz audio found empty) do not count.
                    st.anon_errors += err["code"] in BAD_INPUT_CODES
                else:
                    st.error_ids.add(err["event_id"])
                wake.set()
            elif ev["type"] == "response.done":
                done.put_nowait(ev)
    except ConnectionClosed:
        pass
    if st.closed is None:
        # The culprit is among the first events sent after the last one answered.
        answered = max((int(e.rsplit("_", 1)[1]) for e in st.error_ids if e.startswith("fz")), default=-1)
        suspects = [what for n, what in st.recent if n > answered][:5]
        st.closed = f"closed by the server: {ws.close_code} {ws.close_reason!r}; suspects: {suspects}"
        done.put_nowait({"type": "closed"})


async def _turn(
    ws: ClientConnection, st: Stats, done: asyncio.Queue[dict[str, Any]], speech: list[str], n: int
) -> None:
    """A push-to-talk turn: it must be answered whatever came before it."""
    st.turns += 1
    await ws.send(json.dumps(SETUP))
    await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
    for chunk in speech:
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
    await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
    eid = f"turn_{n}"
    await ws.send(json.dumps({"type": "response.create", "event_id": eid}))
    st.sent += 4 + len(speech)
    ev = await asyncio.wait_for(done.get(), TURN_TIMEOUT_S)
    assert ev["type"] == "response.done", st.closed
    assert eid not in st.error_ids, f"turn {n}: response.create was refused"
    status = ev["response"]["status"]
    st.statuses[status] = st.statuses.get(status, 0) + 1
    # A random tiny model rarely says EOS: the answer ends at max_output_tokens ("incomplete").
    assert status in ("completed", "incomplete"), f"turn {n}: response.done {ev['response']}"
    st.turns_done += 1


async def _session(url: str, idx: int, speech: list[str]) -> Stats:
    rng = random.Random(f"{SEED}/{idx}")
    st = Stats()
    done: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    wake = asyncio.Event()
    async with connect(url, max_size=None, open_timeout=10, close_timeout=5) as ws:
        first = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert first["type"] == "session.created"
        reader = asyncio.create_task(_reader(ws, st, done, wake))
        await ws.send(json.dumps(SETUP))
        st.sent += 1
        for n in range(EVENTS_PER_SESSION):
            if n % TURN_EVERY == TURN_EVERY // 2:
                await _turn(ws, st, done, speech, n)
            sent = make_event(rng, f"fz{idx}_{n}")
            if sent.expect == "id":
                assert sent.event_id is not None
                st.expect_id.add(sent.event_id)
                st.what[sent.event_id] = sent.what
            elif sent.expect == "anon":
                st.expect_anon += 1
            st.recent.append((n, f"{sent.what}: {sent.payload[:160]!r}"))
            try:
                await ws.send(sent.payload)
            except ConnectionClosed:
                await asyncio.wait_for(reader, 10)
                raise AssertionError(f"session {idx}: {st.closed}") from None
            st.sent += 1
            # Keep at most WINDOW bad events unanswered (a client that stops reading is cut off).
            deadline = time.monotonic() + 20
            while len(st.expect_id) + st.expect_anon - st.errors > WINDOW and st.closed is None:
                wake.clear()
                await asyncio.wait_for(wake.wait(), max(0.01, deadline - time.monotonic()))
        await _turn(ws, st, done, speech, EVENTS_PER_SESSION)  # everything sent before it is answered by now
        assert st.closed is None, st.closed
        st.closed = ""  # closed by us from here on
        await ws.close()
        await asyncio.wait_for(reader, 10)
    return st


def _speech() -> list[str]:
    """tests/fixtures/question.wav at 24 kHz PCM16, base64, in 100 ms appends."""
    audio = soxr.resample(fixture_audio("question"), 16000, 24000).astype(np.float32)
    pcm = np.clip(np.round(audio * 32768), -32768, 32767).astype("<i2").tobytes()
    step = 2400 * 2
    return [base64.b64encode(pcm[i : i + step]).decode() for i in range(0, len(pcm), step)]


def test_fuzz_four_sessions(server: Running, capsys: pytest.CaptureFixture[str]) -> None:
    def print(*args: object) -> None:  # the counts show in CI's log, not only on failure
        with capsys.disabled():
            builtins.print(*args, flush=True)

    print(f"\nfuzz seed {SEED} (rerun with OMNIVOX_FUZZ_SEED={SEED})")
    speech = _speech()
    url = f"ws://127.0.0.1:{server.port}/v1/realtime"

    async def main() -> list[Stats]:
        return await asyncio.wait_for(
            asyncio.gather(*(_session(url, i, speech) for i in range(SESSIONS))), TEST_TIMEOUT_S
        )

    t0 = time.monotonic()
    stats = asyncio.run(main())
    elapsed = time.monotonic() - t0
    codes: dict[str, int] = {}
    for st in stats:
        for code, count in st.codes.items():
            codes[code] = codes.get(code, 0) + count
    print(f"events sent {sum(s.sent for s in stats)} (fuzz {SESSIONS * EVENTS_PER_SESSION}; bad: "
          f"{sum(len(s.expect_id) for s in stats)} with an event_id, {sum(s.expect_anon for s in stats)} without); "
          f"server events {sum(s.received for s in stats)}; errors {sum(s.errors for s in stats)} "
          f"({sum(s.anon_errors for s in stats)} about bad input without an event_id); turns answered "
          f"{sum(s.turns_done for s in stats)}/{sum(s.turns for s in stats)}; {elapsed:.1f} s")  # fmt: skip
    statuses: dict[str, int] = {}
    for st in stats:
        for status, count in st.statuses.items():
            statuses[status] = statuses.get(status, 0) + count
    print(f"error codes {dict(sorted(codes.items()))}; turns' response.done status {statuses}")
    for i, st in enumerate(stats):
        assert st.closed == "", f"session {i}: {st.closed}"
        assert not st.bad_server_events, f"session {i}: invalid server events: {st.bad_server_events[:3]}"
        missing = sorted(st.expect_id - st.error_ids)
        assert not missing, f"session {i}: no error for {[(m, st.what[m]) for m in missing[:10]]}"
        assert st.anon_errors >= st.expect_anon, f"session {i}: {st.anon_errors} anonymous errors < {st.expect_anon}"
        assert st.turns_done == st.turns
