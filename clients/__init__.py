"""omnivox clients: they speak only the realtime protocol."""
