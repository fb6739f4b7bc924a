"""The ``dgate`` application: one line per subcommand, and the single error funnel."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import typer

from ..errors import DgateError
from ..runtime.backends.malloc import tune_malloc_from_env
from ._output import err, fail

app = typer.Typer(
    name="dgate",
    help="Retrofit decision gates onto a pretrained image classifier so that easy images exit early.\n\n"
    "Pipeline: extract -> fit -> calibrate -> export -> evaluate / bench. Try `dgate demo` first. "
    "`dgate cascade` chains several extracted networks into one model that runs through the same pipeline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def funnel(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn dgate's errors into a one-line message and exit code 2 (tracebacks with DGATE_DEBUG=1)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (DgateError, OSError) as exc:
            if os.environ.get("DGATE_DEBUG"):
                raise
            fail(
                str(exc) if isinstance(exc, DgateError) else f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")
            )
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]: finished work is kept; run the same command again to resume")
            raise typer.Exit(130) from None

    return wrapper


def command(name: str, fn: Callable[..., Any]) -> None:
    app.command(name)(funnel(fn))


from .bench import bench_command  # noqa: E402
from .calibrate import calibrate_command  # noqa: E402
from .cascade import cascade_command  # noqa: E402
from .demo import demo_command  # noqa: E402
from .export import evaluate_command, export_command  # noqa: E402
from .extract import extract_command  # noqa: E402
from .fit import fit_command  # noqa: E402
from .stages import models_command, stages_command  # noqa: E402

command("demo", demo_command)
command("extract", extract_command)
command("fit", fit_command)
command("calibrate", calibrate_command)
command("cascade", cascade_command)
command("export", export_command)
command("evaluate", evaluate_command)
command("bench", bench_command)
command("stages", stages_command)
command("models", models_command)


def main() -> None:
    """Entry point of the ``dgate`` console script (and ``python -m dgate_cli``)."""
    tune_malloc_from_env()
    app(prog_name="dgate")
