"""Progress on stderr for long calls (an import, an audit verification), drawn by Rich.

On a terminal: one Rich bar per phase, redrawn in place. Otherwise (a log, a pipe, a test): a
plain line per phase and quarter, ``validate: 11/11 rows (100%)``, the lines the docs and tests
read; ``plain=False`` leaves those out, ``quiet=True`` (``--json``) draws nothing at all.
"""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from .common import note, stderr_console

DONE = "DONE"  # the last phase a server reports: every bar is full


class PhaseProgress:
    """``with PhaseProgress() as bar: bar.update(phase, done, total)``."""

    def __init__(
        self,
        *,
        unit: str = "rows",
        plain: bool = True,
        quiet: bool = False,
        console: Console | None = None,
    ) -> None:
        self.unit = unit
        self.plain = plain
        self.quiet = quiet
        self.console = console or stderr_console()
        self._bars: Progress | None = None
        self._tasks: dict[str, TaskID] = {}
        self._last: tuple[str, int] = ("", -1)

    def __enter__(self) -> PhaseProgress:
        if not self.quiet and self.console.is_terminal:
            self._bars = Progress(
                TextColumn("{task.description:<8}"),
                BarColumn(),
                TaskProgressColumn(),
                MofNCompleteColumn(),
                TextColumn(self.unit),
                TimeElapsedColumn(),
                console=self.console,
                redirect_stdout=False,  # stdout is the command's data, never the bar's
            )
            self._bars.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._bars is not None:
            self._bars.stop()

    def update(self, phase: str, done: int, total: int) -> None:
        if self.quiet:
            return
        if self._bars is not None:
            self._draw(phase, done, total)
        elif self.plain:
            pct = 100 * done // total if total else 100
            if (phase, pct // 25) != self._last:  # a line per phase and quarter
                note(f"{phase.lower()}: {done}/{total} {self.unit} ({pct}%)")
                self._last = (phase, pct // 25)

    def _draw(self, phase: str, done: int, total: int) -> None:
        assert self._bars is not None
        if phase == DONE:
            for task in self._bars.tasks:
                self._bars.update(task.id, completed=task.total)
            return
        if phase not in self._tasks:  # a new phase: the ones before it are finished
            for task in self._bars.tasks:
                self._bars.update(task.id, completed=task.total)
            self._tasks[phase] = self._bars.add_task(phase.lower(), total=total)
        self._bars.update(self._tasks[phase], completed=done, total=total)
