"""The `omnivox` command line: the top of the import graph, dispatching to model, server and benchmarks."""
