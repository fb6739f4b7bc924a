"""The only rich Consoles: data on stdout, progress, warnings and errors on stderr."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from .._io import dumps

out = Console(soft_wrap=False)
err = Console(stderr=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print a one-line error on stderr and exit with ``code``."""
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)


def note(message: str) -> None:
    err.print(f"[dim]{escape(message)}[/]", soft_wrap=True)


def print_json(obj: Any) -> None:
    """Print one JSON object on stdout (plain text, no colour)."""
    sys.stdout.write(dumps(obj) + "\n")
    sys.stdout.flush()


class RateColumn(ProgressColumn):
    """Items per second, with a unit (``img/s``)."""

    def __init__(self, unit: str = "img/s"):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} {self.unit}" if speed else f"- {self.unit}", style="cyan")


@contextlib.contextmanager
def progress(enabled: bool = True, unit: str = "img/s") -> Iterator[Callable[[str, int, int], None]]:
    """A progress callback ``(task, done, total)`` that draws rich bars on stderr.

    Disabled (a no-op callback) when ``enabled`` is false or stderr is not a terminal.
    """
    if not enabled or not err.is_terminal:
        yield lambda task, done, total: None
        return
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        redirect_stdout=False,
        transient=False,
    )
    tasks: dict[str, Any] = {}

    def update(task: str, done: int, total: int) -> None:
        if task not in tasks:
            tasks[task] = bar.add_task(task, total=total, completed=0)
        bar.update(tasks[task], completed=done, total=total)

    with bar:
        yield update


def pct(x: float | None, digits: int = 2) -> str:
    return "-" if x is None or x != x else f"{100 * x:.{digits}f}%"
