"""omnivox streaming package."""
