"""The reference Python client for the omnivox realtime protocol."""
