"""Progress reporting: the library takes an optional ``rich.progress.Progress``; the CLI supplies one."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator


class Step:
    """One bar: ``advance(n)`` and ``describe(text)``; a no-op when no Progress is given."""

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
            self.progress.update(self.task, total=total)

    def done(self) -> None:
        if self.task is not None:
            t = self.progress.tasks[self.task] if isinstance(self.progress.tasks, dict) else None
            self.progress.update(self.task, completed=(t.total if t else None) or 1, total=(t.total if t else None) or 1)


@contextmanager
def step(progress, description: str, total: float | None = None) -> Iterator[Step]:
    s = Step(progress, description, total)
    yield s


def advancer(s: Step) -> Callable[..., None]:
    return lambda n=1: s.advance(n)
