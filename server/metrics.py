"""Prometheus metrics, on a registry owned by the app (no process globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.active_sessions = Gauge("omnivox_active_sessions", "Open realtime sessions", registry=r)
        self.session_slots = Gauge("omnivox_session_slots", "Configured session slots", registry=r)
        self.responses = Counter("omnivox_responses", "Responses by final status", ["status"], registry=r)
        self.ttfa = Histogram(
            "omnivox_time_to_first_audio_seconds",
            "End of user speech to first audio byte sent",
            buckets=(0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0),
            registry=r,
        )
        self.steps_per_s = Gauge("omnivox_decode_steps_per_second", "Decode steps/s of the last response", registry=r)
        self.interrupts = Counter("omnivox_interrupts", "Barge-in interruptions", ["mode"], registry=r)
        self.errors = Counter("omnivox_errors", "Error events sent, by code", ["code"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
