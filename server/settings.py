"""Server settings: command-line flags over `OMNIVOX_*` environment variables over defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from streaming.config import StageThreads


class IceServer(BaseModel):
    """One STUN/TURN server for WebRTC calls, as the browser's RTCIceServer."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    urls: str | list[str]
    username: str | None = None
    credential: str | None = None


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OMNIVOX_", frozen=True, extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    checkpoint_dir: Path | None = None
    checkpoint: str | None = None  # hub id
    device: str = "cpu"
    dtype: str = "auto"  # model.omni.resolve_precision: bf16 on CUDA; on a CPU by a timed probe (model.probe)
    whisper_window: Literal["padded", "trimmed"] = "padded"  # model.config.WHISPER_WINDOWS; trimmed is approximate
    api_key: SecretStr | None = None
    allow_unauthenticated: bool = False  # needed to bind a non-loopback address without a key
    max_sessions: int = Field(8, ge=1, le=1024)
    # torch threads per runner stage, "llm=2,encoder=2,encoder_busy=1,snac=1" (streaming.config.
    # StageThreads); unnamed stages: all cores for llm and a lone encode, half beside answers, 1 for SNAC.
    stage_threads: str = ""
    # While answers are being decoded, a new prompt is prefilled in parts of at most this many
    # positions with their steps in between (0: at once, holding them for the whole prefill).
    prefill_chunk: int = Field(64, ge=0)
    # int8/int4 on a CPU: decode steps as one ONNX Runtime graph of the same weights (model.decode_graph).
    decode_graph: bool = True
    max_frame_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    # A client this far behind (events or bytes queued for it), or that takes nothing for
    # send_timeout_s while data waits, is disconnected with 1008.
    send_buffer_events: int = Field(512, ge=16)
    send_buffer_bytes: int = Field(8 * 1024 * 1024, ge=64 * 1024)
    send_timeout_s: float = Field(10.0, gt=0)
    max_new_tokens: int | None = None
    # How far (ms of audio sent) an answer's generation may run ahead of its playback, by default
    # (a client's omnivox.max_audio_lead_ms overrides it per session): more rides out stalls,
    # less wastes less generation on a barge-in and keeps a late "stop omni" cancelling.
    max_audio_lead_ms: float = Field(1000.0, ge=100, le=60000)
    interrupt_detector: bool = True  # load the faster-whisper command detector
    turn_model: bool = True  # load the Smart Turn end-of-turn model that semantic_vad uses
    web_dir: Path | None = None  # default: clients/web of this checkout
    shutdown_timeout_s: float = Field(5.0, ge=0.1)
    log_level: str = "info"
    # Client secrets (POST /v1/realtime/client_secrets): at most this many unused ones live at once;
    # beyond that (after dropping the expired) a mint answers 429.
    max_client_secrets: int = Field(1024, ge=1, le=1_000_000)
    # POST /v1/demo/client_secret mints a short-lived secret with NO auth, for the bundled web page.
    demo_tokens: bool = False
    demo_token_seconds: float = Field(60.0, gt=0, le=600)
    # WebRTC calls. ICE servers (JSON in OMNIVOX_ICE_SERVERS), e.g.
    # [{"urls": "turn:turn.example.com:3478", "username": "u", "credential": "p"}]; none by default
    # (host candidates only: the server must be reachable over UDP from the clients).
    ice_servers: tuple[IceServer, ...] = ()
    rtc_connect_timeout_s: float = Field(15.0, gt=0)  # offer answered -> events channel open
    rtc_silence_timeout_s: float = Field(30.0, gt=0)  # no RTP from the peer this long ends the call
    # Origins whose pages may call the HTTP endpoints (client secrets, calls) from the browser
    # (JSON in OMNIVOX_CORS_ORIGINS, e.g. ["https://app.example.com"]); none by default: the
    # bundled page is same-origin.
    cors_origins: tuple[str, ...] = ()

    @field_validator("stage_threads")
    @classmethod
    def _valid_stage_threads(cls, value: str) -> str:
        StageThreads.parse(value)  # raises ValueError with what is wrong
        return value

    def threads(self) -> StageThreads:
        return StageThreads.parse(self.stage_threads)

    def is_loopback(self) -> bool:
        return self.host in ("127.0.0.1", "localhost", "::1") or self.host.startswith("127.")
