"""Voice frameworks as their docs set them up, pointed at a real `omnivox serve` (only the URL and a
dummy key changed): openai-agents, pipecat, LiveKit (plugin session and AgentSession) and the openai
SDK's push-to-talk flow.

Each barge-in test streams a microphone at real-time pace through the framework: the question, a
completed spoken answer (audio and transcript), the question again, and "stop omni" while the second
answer plays, which the server must end as `cancelled` (`turn_detected`). The frameworks reach the
server through a recording proxy (`Tap`), so the server's side is asserted on the wire and every
failure shows the whole conversation; the framework's side (its error events and ERROR logs, the
audio and text it delivered, its interruption signal) is asserted on what the framework reports.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.settings import ServerSettings

from .conftest import fixture_audio
from .framework_helpers import (
    ErrorLogs,
    Mic,
    Tap,
    assert_no_errors,
    assert_wire_ok,
    brief,
    loguru_errors,
    pcm16,
    spoken_turn_then_barge_in,
)
from .test_server import Running, start_server, stop_server

TEST_TIMEOUT = 75  # s, per test; each runs at real-time pace and takes ~20-40 s


@pytest.fixture(scope="module")
def server(tiny_ckpt: Path) -> Iterator[Running]:
    # A small audio lead keeps a barge-in's answer generating while it plays, on a slow host
    # too (at the default 1 s a short answer can finish generating before "stop omni" is heard;
    # then there is nothing to cancel, and these tests check the cancel).
    r = start_server(ServerSettings(port=0, checkpoint_dir=tiny_ckpt, max_sessions=4, dtype="float32",
                                    max_audio_lead_ms=100, log_level="warning"))  # fmt: skip
    yield r
    stop_server(r)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, TEST_TIMEOUT))


# -- openai-agents ---------------------------------------------------------------------------------


def test_openai_agents_realtime_turn_and_barge_in(server: Running) -> None:
    """openai-agents' realtime quickstart: RealtimeAgent + RealtimeRunner, audio in via send_audio."""
    from agents.realtime import RealtimeAgent, RealtimeRunner

    async def main() -> tuple[Tap, Any, list[Any]]:
        agent = RealtimeAgent(
            name="Assistant",
            instructions="You are a helpful voice assistant. Keep responses short and conversational.",
        )
        # the quickstart's model settings (equal to the SDK's defaults)
        runner = RealtimeRunner(
            starting_agent=agent,
            config={
                "model_settings": {
                    "model_name": "gpt-realtime-2",
                    "audio": {
                        "input": {
                            "format": "pcm16",
                            "transcription": {"model": "gpt-4o-mini-transcribe"},
                            "turn_detection": {"type": "semantic_vad", "interrupt_response": True},
                        },
                        "output": {"format": "pcm16", "voice": "ash"},
                    },
                }
            },
        )
        events: list[Any] = []
        async with Tap(server.port) as tap:
            session = await runner.run(model_config={"url": tap.realtime_url, "api_key": "dummy"})
            async with session:

                async def consume() -> None:
                    async for ev in session:
                        events.append(ev)

                consumer = asyncio.create_task(consume())
                try:
                    async with Mic(session.send_audio, rate=24000) as mic:
                        barge = await spoken_turn_then_barge_in(tap, mic)
                        mic.check()
                finally:
                    consumer.cancel()
                    await asyncio.gather(consumer, return_exceptions=True)
            consumer_exc = consumer.exception() if consumer.done() and not consumer.cancelled() else None
            if consumer_exc is not None:
                raise AssertionError(f"iterating the session raised {consumer_exc!r}\n{tap.summary()}")
        return tap, barge, events

    with ErrorLogs("openai.agents").active() as logs:
        tap, barge, events = run(main())

    names = [e.type for e in events]
    framework_errors = [e.error for e in events if e.type == "error"]
    assert not framework_errors, f"openai-agents reported errors: {brief(framework_errors)}\n{tap.summary()}"
    assert not logs.records, f"openai-agents logged errors: {logs.records}\n{tap.summary()}"
    assert_wire_ok(tap, barge)
    first_audio = [e for e in events if e.type == "audio" and e.audio.response_id == barge.first]
    assert first_audio and sum(len(e.audio.data) for e in first_audio) == tap.audio_bytes(barge.first)
    history: dict[str, Any] = {}  # the app's view of the conversation, from history_updated/_added
    for e in events:
        for item in e.history if e.type == "history_updated" else [e.item] if e.type == "history_added" else []:
            history[item.item_id] = item
    transcripts = [
        part.transcript
        for item in history.values()
        if item.type == "message" and item.role == "assistant"
        for part in item.content
        if getattr(part, "transcript", None)
    ]
    assert transcripts, f"no assistant transcript in the session history: {history}"
    assert names.count("agent_start") >= 2 and names.count("agent_end") >= 2, names
    # the barge-in reaches the app as audio_interrupted (stop playback) after the second answer's audio
    i = next(i for i, e in enumerate(events) if e.type == "audio" and e.audio.response_id == barge.second)
    assert "audio_interrupted" in names[i:], f"no audio_interrupted after the barge-in: {names[i:][:40]}"


# -- pipecat ---------------------------------------------------------------------------------------


def test_pipecat_openai_realtime_turn_and_barge_in(server: Running) -> None:
    """pipecat's examples/realtime/realtime-openai.py session properties (semantic VAD, transcription,
    near-field noise reduction) in that example's pipeline shape, with no transport: microphone frames
    are queued into the pipeline, a sink collects what the service emits."""
    from pipecat.frames.frames import (
        ErrorFrame,
        Frame,
        InputAudioRawFrame,
        InterruptionFrame,
        TTSAudioRawFrame,
        TTSTextFrame,
    )
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineParams, PipelineWorker
    from pipecat.processors.aggregators.llm_context import LLMContext
    from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
    from pipecat.services.openai.realtime.events import (
        AudioConfiguration,
        AudioInput,
        InputAudioNoiseReduction,
        InputAudioTranscription,
        SemanticTurnDetection,
        SessionProperties,
    )
    from pipecat.services.openai.realtime.llm import OpenAIRealtimeLLMService
    from pipecat.workers.runner import WorkerRunner

    class Sink(FrameProcessor):
        def __init__(self) -> None:
            super().__init__()
            self.frames: list[tuple[float, Frame, FrameDirection]] = []

        async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
            await super().process_frame(frame, direction)
            self.frames.append((asyncio.get_running_loop().time(), frame, direction))
            await self.push_frame(frame, direction)

    async def main() -> tuple[Tap, Any, Sink, list[Any]]:
        pipeline_errors: list[Any] = []
        async with Tap(server.port) as tap:
            llm = OpenAIRealtimeLLMService(
                api_key="dummy",
                base_url=tap.realtime_base,
                settings=OpenAIRealtimeLLMService.Settings(
                    system_instruction="You are a helpful and friendly AI. Keep your responses short.",
                    session_properties=SessionProperties(
                        audio=AudioConfiguration(
                            input=AudioInput(
                                transcription=InputAudioTranscription(),
                                turn_detection=SemanticTurnDetection(),
                                noise_reduction=InputAudioNoiseReduction(type="near_field"),
                            )
                        ),
                    ),
                ),
            )
            user_aggregator, assistant_aggregator = LLMContextAggregatorPair(LLMContext())
            sink = Sink()
            worker = PipelineWorker(
                Pipeline([user_aggregator, llm, sink, assistant_aggregator]),
                params=PipelineParams(audio_in_sample_rate=16000),
                idle_timeout_secs=None,
            )
            started = asyncio.Event()

            @worker.event_handler("on_pipeline_started")
            async def _started(worker: Any, frame: Any) -> None:
                started.set()

            @worker.event_handler("on_pipeline_error")
            async def _error(worker: Any, frame: Any) -> None:
                pipeline_errors.append(frame)

            runner = WorkerRunner(handle_sigint=False)
            await runner.add_workers(worker)
            running = asyncio.create_task(runner.run())
            try:
                await asyncio.wait_for(started.wait(), 20)

                async def send(pcm: bytes) -> None:
                    await worker.queue_frame(InputAudioRawFrame(audio=pcm, sample_rate=16000, num_channels=1))

                async with Mic(send, rate=16000) as mic:
                    barge = await spoken_turn_then_barge_in(tap, mic)
                    mic.check()
            finally:
                await worker.cancel()
                await asyncio.wait_for(asyncio.gather(running, return_exceptions=True), 20)
        return tap, barge, sink, pipeline_errors

    with loguru_errors() as logs:
        tap, barge, sink, pipeline_errors = run(main())

    frames = [f for _, f, _ in sink.frames]
    error_frames = [f for f in frames if isinstance(f, ErrorFrame)]
    assert not pipeline_errors and not error_frames, (
        f"pipecat reported errors: {[getattr(f, 'error', f) for f in pipeline_errors or error_frames]}\n{tap.summary()}"
    )
    assert not logs, f"pipecat logged errors: {logs}\n{tap.summary()}"
    assert_wire_ok(tap, barge)
    audio = [f for f in frames if isinstance(f, TTSAudioRawFrame)]
    assert audio and all(f.sample_rate == 24000 for f in audio)
    assert sum(len(f.audio) for f in audio) >= tap.audio_bytes(barge.first)
    assert "".join(f.text for f in frames if isinstance(f, TTSTextFrame)).strip()
    # the barge-in reaches the pipeline as an interruption after the second answer started playing
    assert any(isinstance(f, InterruptionFrame) and t >= barge.second_first_audio_t for t, f, _ in sink.frames), (
        f"no InterruptionFrame after the barge-in: {[type(f).__name__ for f in frames][-60:]}"
    )


# -- LiveKit ----------------------------------------------------------------------------------------


def test_livekit_realtime_session_turn_and_barge_in(server: Running) -> None:
    """livekit-plugins-openai's RealtimeModel with its defaults (semantic VAD, transcription, audio
    and text): the model's session, rtc.AudioFrames pushed, generations read from their streams."""
    from livekit import rtc
    from livekit.agents import llm
    from livekit.agents.metrics import RealtimeModelMetrics
    from livekit.plugins.openai.realtime import RealtimeModel

    async def main() -> tuple[Tap, Any, dict[str, Any]]:
        seen: dict[str, Any] = {"generations": [], "errors": [], "speech_started": [], "metrics": []}
        loop = asyncio.get_running_loop()
        consumers: list[asyncio.Task[None]] = []

        async def consume(ev: llm.GenerationCreatedEvent) -> None:
            rec: dict[str, Any] = {"response_id": ev.response_id, "audio_samples": 0, "text": "", "t": loop.time()}
            seen["generations"].append(rec)

            async def message(msg: llm.MessageGeneration) -> None:
                async def audio() -> None:
                    async for frame in msg.audio_stream:
                        rec["audio_samples"] += frame.samples_per_channel

                async def text() -> None:
                    async for delta in msg.text_stream:
                        rec["text"] += delta

                await asyncio.gather(audio(), text())

            async for msg in ev.message_stream:
                await message(msg)

        async with Tap(server.port) as tap:
            model = RealtimeModel(base_url=tap.http_v1, api_key="dummy")
            session = model.session()
            session.on("generation_created", lambda ev: consumers.append(asyncio.create_task(consume(ev))))
            session.on("error", lambda ev: seen["errors"].append(ev))
            session.on("input_speech_started", lambda ev: seen["speech_started"].append(loop.time()))
            session.on("metrics_collected", lambda m: seen["metrics"].append(m))

            async def send(pcm: bytes) -> None:
                session.push_audio(rtc.AudioFrame(pcm, 24000, 1, len(pcm) // 2))

            try:
                async with Mic(send, rate=24000) as mic:
                    barge = await spoken_turn_then_barge_in(tap, mic)
                    mic.check()
                await asyncio.wait_for(asyncio.gather(*consumers, return_exceptions=True), 5)
            finally:
                await session.aclose()
                await model.aclose()
        return tap, barge, seen

    with ErrorLogs("livekit").active() as logs:
        tap, barge, seen = run(main())

    assert not seen["errors"], f"LiveKit emitted errors: {_lk_errors(seen['errors'])}\n{tap.summary()}"
    assert not logs.records, f"LiveKit logged errors: {logs.records}\n{tap.summary()}"
    assert_wire_ok(tap, barge)
    gens = {g["response_id"]: g for g in seen["generations"]}
    assert barge.first in gens and barge.second in gens, seen["generations"]
    first = gens[barge.first]
    assert first["audio_samples"] * 2 == tap.audio_bytes(barge.first) and first["text"].strip(), first
    metrics = {m.request_id: m for m in seen["metrics"] if isinstance(m, RealtimeModelMetrics)}
    # The second answer's metrics say what the wire said: cancelled by the barge-in, or (made
    # whole before "stop omni" was heard, which assert_wire_ok allows) completed.
    barge_cancelled = tap.response_done(barge.second)["response"]["status"] == "cancelled"
    assert metrics[barge.first].cancelled is False and metrics[barge.second].cancelled is barge_cancelled, metrics
    # the barge-in reaches the agent as input_speech_started while the second answer plays
    assert any(t >= barge.second_first_audio_t for t in seen["speech_started"]), seen["speech_started"]


def test_livekit_agent_session_generate_reply(server: Running) -> None:
    """LiveKit's AgentSession on the plugin's RealtimeModel, started without a room (no audio I/O),
    as in the docs: `await session.generate_reply(instructions=...)`; then a reply to typed input."""
    from livekit.agents import Agent, AgentSession
    from livekit.plugins.openai.realtime import RealtimeModel

    async def main() -> tuple[Tap, dict[str, Any]]:
        seen: dict[str, Any] = {"errors": [], "items": [], "handles": []}
        async with Tap(server.port) as tap:
            session = AgentSession(llm=RealtimeModel(base_url=tap.http_v1, api_key="dummy"))
            session.on("error", lambda ev: seen["errors"].append(ev))
            session.on("conversation_item_added", lambda ev: seen["items"].append(ev.item))
            try:
                await session.start(agent=Agent(instructions="You are a helpful voice AI assistant."))
                await tap.wait_for(lambda e: e["type"] == "session.updated", what="session.updated", timeout=20)
                for kwargs in ({"instructions": "Greet the user and offer your assistance."},
                               {"user_input": "What can you do?"}):  # fmt: skip
                    handle = session.generate_reply(**kwargs)  # type: ignore[arg-type]
                    await asyncio.wait_for(handle.wait_for_playout(), 40)
                    seen["handles"].append((kwargs, handle.interrupted, handle.exception()))
                await asyncio.sleep(0.5)
            finally:
                await asyncio.wait_for(session.aclose(), 20)
        return tap, seen

    with ErrorLogs("livekit").active() as logs:
        tap, seen = run(main())

    assert not seen["errors"], f"LiveKit emitted errors: {_lk_errors(seen['errors'])}\n{tap.summary()}"
    assert not logs.records, f"LiveKit logged errors: {logs.records}\n{tap.summary()}"
    assert_no_errors(tap)
    for kwargs, interrupted, exc in seen["handles"]:
        assert exc is None and not interrupted, (kwargs, exc, interrupted, tap.summary())
    creates = [e for e in tap.client_events() if e["type"] == "response.create"]
    created = [e for e in tap.server_events() if e["type"] == "response.created"]
    assert len(creates) == 2 and len(created) == 2, tap.summary()
    # generate_reply matches its response by the metadata it sent: the server must echo it
    for create, resp in zip(creates, created, strict=True):
        assert resp["response"].get("metadata") == create["response"]["metadata"], tap.summary()
        done = tap.response_done(resp["response"]["id"])
        assert done is not None and done["response"]["status"] == "completed", tap.summary()
        assert tap.audio_bytes(resp["response"]["id"]) > 0 and tap.transcript(resp["response"]["id"]).strip()
    # update_chat_ctx waits for its own item id to come back in conversation.item.added
    (create_item,) = [e["item"] for e in tap.client_events() if e["type"] == "conversation.item.create"]
    added = [e["item"]["id"] for e in tap.server_events() if e["type"] == "conversation.item.added"]
    assert create_item["id"] in added, f"the client's item id was not kept: {create_item['id']}\n{tap.summary()}"
    replies = [i for i in seen["items"] if getattr(i, "role", None) == "assistant"]
    assert len(replies) == 2 and all(r.text_content and not r.interrupted for r in replies), replies


def _lk_errors(events: list[Any]) -> list[str]:
    """LiveKit error events as the server error (or exception) each carries."""
    out = []
    for ev in events:
        err = getattr(ev, "error", ev)  # ErrorEvent (AgentSession) or RealtimeModelError (session)
        err = getattr(err, "error", err)
        out.append(repr(getattr(err, "body", None) or err)[:400])
    return out


# -- openai SDK: push-to-talk ------------------------------------------------------------------------


def test_openai_sdk_push_to_talk(server: Running) -> None:
    """turn_detection null, append, commit (which must not start a response), response.create."""
    from openai import AsyncOpenAI

    async def main() -> Tap:
        async with Tap(server.port) as tap:
            client = AsyncOpenAI(api_key="dummy", websocket_base_url=tap.ws_v1)
            async with client.realtime.connect(model="gpt-realtime") as conn:
                await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
                upd = await tap.wait_for(lambda e: e["type"] in ("session.updated", "error"),
                                         what="session.updated", timeout=20)  # fmt: skip
                assert upd.event["type"] == "session.updated", f"turn_detection null refused\n{tap.summary()}"
                assert upd.event["session"]["audio"]["input"]["turn_detection"] is None, upd.event

                pcm = pcm16(np.concatenate([np.zeros(4800, np.float32), fixture_audio("question")]), 24000)
                for i in range(0, len(pcm), 9600):  # 200 ms appends
                    await conn.input_audio_buffer.append(audio=_b64(pcm[i : i + 9600]))
                await conn.input_audio_buffer.commit()
                committed = await tap.wait_for(lambda e: e["type"] in ("input_audio_buffer.committed", "error"),
                                               what="input_audio_buffer.committed", timeout=20)  # fmt: skip
                assert committed.event["type"] == "input_audio_buffer.committed", f"commit refused\n{tap.summary()}"
                await asyncio.sleep(1.5)  # commit alone must not start a response
                assert not any(e["type"].startswith("response.") for e in tap.server_events()), (
                    f"input_audio_buffer.commit started a response by itself\n{tap.summary()}"
                )
                added = [e for e in tap.server_events() if e["type"] == "conversation.item.added"]
                assert added and added[0]["item"]["role"] == "user", tap.summary()

                await conn.response.create()
                async for event in conn:  # the SDK parses every event into its own types
                    if event.type == "response.done":
                        break
        return tap

    tap = run(main())
    assert_no_errors(tap)
    created = [e for e in tap.server_events() if e["type"] == "response.created"]
    assert len(created) == 1, tap.summary()
    rid = created[0]["response"]["id"]
    done = tap.response_done(rid)
    assert done is not None and done["response"]["status"] == "completed", tap.summary()
    assert tap.audio_bytes(rid) > 0 and tap.transcript(rid).strip(), tap.summary()


def _b64(pcm: bytes) -> str:
    return base64.b64encode(pcm).decode()
