"""omnivox model package: pure compute (no asyncio, no sockets)."""
