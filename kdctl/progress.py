"""Progress reporting: the library takes an optional ``rich.progress.Progress``; the CLI supplies one."""

from __future__ import annotations


class Step:
    """One bar: ``advance(n)``, ``describe(text)``, ``total(n)``; a no-op when no Progress is given."""

    def __init__(self, progress, description: str, total: float | None):
        self.progress = progress
        self.task = progress.add_task(description, total=total) if progress is not None else None

    def advance(self, n: float = 1) -> None:
        if self.task is not None:
            self.progress.advance(self.task, n)

    def describe(self, text: str) -> None:
        if self.task is not None:
            self.progress.update(self.task, description=text)

    def total(self, total: float) -> None:
        if self.task is not None:
            self.progress.reset(self.task, total=total)

    def completed(self, n: float) -> None:
        if self.task is not None:
            self.progress.update(self.task, completed=n)
