"""Optional accelerators of the reference path, each measured in benchmarks/RESULTS.md."""
