"""omnivox server package."""
