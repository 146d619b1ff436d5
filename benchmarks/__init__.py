"""omnivox benchmarks package."""
