"""The optional gate kernel, compiled at install time (the package installs and runs without it).

Everything else about the package is in pyproject.toml.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "dgate_cli.runtime.backends._gates",
            ["dgate_cli/runtime/backends/_gates.c"],
            # fixed float32 arithmetic: no fused multiply-add contraction, no fast-math reordering
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-fast-math"],
            optional=True,  # no compiler or no Python headers: installed without it, the reference path runs
        )
    ]
)
