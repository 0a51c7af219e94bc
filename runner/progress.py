"""What a run shows while it works: a line per phase, bars with an ETA, and the same lines in
the run's log file.

* `console()` is a rich Console on stderr whose printed lines also go to the `runner.console`
  logger, so Hydra's log file in the run folder (`outputs/<date>/<time>/<app>.log`) keeps them;
  Hydra's own console handler skips that logger (conf/config.yaml), so nothing shows twice.
* `phase(console, what)` prints what starts and, when it ends, how long it took.
* `Heartbeat` decides when a plain progress line is due where no live bar is seen: a log file
  always, the screen when stderr is not a terminal (CI, pipes).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.text import Text

ECHO = logging.getLogger("runner.console")
HEARTBEAT_SECONDS = 10.0  # a plain progress line at least this often, when not a terminal


class LoggedConsole(Console):
    """A Console whose printed text also goes to the `runner.console` logger (plain text)."""

    def print(self, *objects, **kwargs) -> None:  # noqa: A003 -- rich's name
        super().print(*objects, **kwargs)
        text = " ".join(Text.from_markup(o).plain if isinstance(o, str) else o.plain
                        for o in objects if isinstance(o, str | Text))
        if text.strip():
            ECHO.info(text)

    def log_line(self, text: str) -> None:
        """A progress line: on screen only where no live bar shows it, always in the log."""
        if self.is_terminal:
            ECHO.info(text)
        else:
            self.print(text, markup=False, highlight=False)


class NotEcho(logging.Filter):
    """For a console log handler: drop the lines LoggedConsole has already shown."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name != ECHO.name


def console() -> LoggedConsole:
    """The run's console on stderr. Off a terminal, lines are not wrapped (a log reader or grep
    wants one line per message) and the bars' final render gets room for every column."""
    out = LoggedConsole(stderr=True, soft_wrap=True)
    if not out.is_terminal:
        out.width = 160
    return out


def say(console: Console | None, text: str) -> None:
    """Print a line on `console`, if there is one (set-up code also runs without one)."""
    if console is not None:
        console.print(text)


@contextmanager
def phase(console: Console, what: str) -> Iterator[None]:
    """`what ...` when it starts, `what: done in 1.2s` when it ends."""
    console.print(f"[bold]{what}[/] ...")
    started = time.perf_counter()
    yield
    console.print(f"[bold]{what}[/]: done in {format_seconds(time.perf_counter() - started)}")


def format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


class Heartbeat:
    """A plain progress line is due every `every` steps or `seconds` seconds, whichever first."""

    def __init__(self, every: int, seconds: float = HEARTBEAT_SECONDS, clock=time.monotonic):
        self.every, self.seconds, self.clock = every, seconds, clock
        self.last = clock()

    def due(self, step: int) -> bool:
        now = self.clock()
        if step % self.every == 0 or now - self.last >= self.seconds:
            self.last = now
            return True
        return False


def eta(done: float, total: float, elapsed: float) -> str:
    """Time left at the rate so far, e.g. `eta 2m05s` (`eta ?` before any progress)."""
    if done <= 0 or elapsed <= 0:
        return "eta ?"
    return f"eta {format_seconds(max(total - done, 0) * elapsed / done)}"
