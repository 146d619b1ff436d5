"""omnivox clients package."""
