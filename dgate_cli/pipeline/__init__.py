"""The pipeline's steps, each a library function returning a dataclass: extract, fit, calibrate, export (and stages, demo)."""
