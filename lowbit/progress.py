"""The one progress bar of lowbit (rich): ``with Bar(total, "perplexity") as bar: bar.advance(info=...)``.

Disabled (``enabled=False``) it does nothing; long work elsewhere (calibration, evaluation,
self-generated data) uses it so every bar looks the same: description, bar, done/total, a free
``info`` field (e.g. the running perplexity), elapsed time and ETA.
"""

from __future__ import annotations

__all__ = ["Bar"]


class Bar:
    def __init__(self, total: int, desc: str, enabled: bool = True, unit: str = ""):
        self._p = None
        if enabled and total:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self._p = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                               TextColumn(unit), TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                               TimeRemainingColumn(), transient=False)
            self._p.start()
            self._task = self._p.add_task(desc, total=total, info="")

    def advance(self, n: int = 1, info: str | None = None) -> None:
        if self._p is not None:
            kw = {} if info is None else {"info": info}
            self._p.update(self._task, advance=n, **kw)

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()
            self._p = None

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
