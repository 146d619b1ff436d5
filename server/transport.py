"""What a `Connection` needs of its transport: receive a frame, send text or bytes, close.

The WebSocket (`WebSocketTransport`) and a WebRTC call (`server.webrtc.RtcTransport`) both
carry the same realtime events; a call also carries audio on a media track, which comes in as
`MediaAudio` and goes out through a `Player` instead of `response.output_audio.delta` events.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from starlette.websockets import WebSocket, WebSocketDisconnect

from .playout import Played, PlayoutEvent


@dataclass(frozen=True)
class MediaAudio:
    """Audio from a media track, already 24 kHz mono PCM16 (the transport resampled it)."""

    pcm: bytes


MEDIA_INPUT_RATE = 24000

Incoming = str | bytes | MediaAudio


class Player(Protocol):
    """Output audio played on a media track, paced by the transport in real time."""

    @property
    def response_id(self) -> str | None: ...

    def push(self, response_id: str, pcm: bytes) -> None: ...

    def end(self, response_id: str) -> None: ...

    def clear(self) -> Played | None: ...

    def listen(self, listener: Callable[[PlayoutEvent], None]) -> None: ...


class Transport(Protocol):
    @property
    def player(self) -> Player | None:
        """Set when output audio goes on a media track (WebRTC), not in events."""

    async def receive(self) -> Incoming | None:
        """The next frame from the client; None once it is gone."""

    async def send_text(self, text: str) -> None: ...

    async def send_bytes(self, data: bytes) -> None: ...

    async def close(self, code: int, reason: str) -> None: ...


class WebSocketTransport:
    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws

    @property
    def player(self) -> Player | None:
        return None

    async def receive(self) -> Incoming | None:
        while True:
            try:
                message = await self.ws.receive()
            except (WebSocketDisconnect, RuntimeError):
                return None
            if message["type"] == "websocket.disconnect":
                return None
            if message.get("bytes") is not None:
                data: bytes = message["bytes"]
                return data
            if message.get("text") is not None:
                text: str = message["text"]
                return text

    async def send_text(self, text: str) -> None:
        await self.ws.send_text(text)

    async def send_bytes(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def close(self, code: int, reason: str) -> None:
        await self.ws.close(code=code, reason=reason)
