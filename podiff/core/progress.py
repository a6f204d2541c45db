"""Progress as a person sees it: a bar on a terminal, plain lines in a log.

``progress_bar`` is ``tqdm`` where standard error is a terminal and nothing otherwise (a bar's
carriage-return frames make a log file unreadable); ``log_line`` is the line a long loop prints
instead at its milestones (training prints one per validation), only when no bar is drawn.

>>> bar = progress_bar(range(3), enabled=False)
>>> list(bar)
[0, 1, 2]
"""

from __future__ import annotations

import sys


def interactive() -> bool:
    """Whether standard error is a terminal (where a progress bar redraws in place)."""
    stream = sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def progress_bar(iterable=None, *, enabled: bool = True, **kwargs):
    """``tqdm(iterable, **kwargs)``, drawn only when ``enabled`` and on a terminal."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not (enabled and interactive()), **kwargs)


def log_line(text: str, *, enabled: bool = True) -> None:
    """``text`` as one line on standard error when ``enabled`` and no bar is drawn (a log)."""
    if enabled and not interactive():
        print(text, file=sys.stderr, flush=True)


__all__ = ["interactive", "log_line", "progress_bar"]
