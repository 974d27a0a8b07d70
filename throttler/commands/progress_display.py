"""Progress of running groups on stderr: bars on a terminal, plain lines elsewhere.

On a terminal each running group has a tqdm bar (bytes read, files read of
total, rate and time left). When stderr is not a terminal (Argo, cron,
journald) one plain line per running group is written every
``every_seconds``. ``quiet`` shows nothing. The figures come from
:meth:`throttler.service.service.Service.running_groups`.
"""

from __future__ import annotations

import sys

from throttler.units import format_bytes

BAR, LINES, QUIET = "bar", "lines", "quiet"


def choose_mode(quiet: bool, stream=sys.stderr) -> str:
    if quiet:
        return QUIET
    return BAR if getattr(stream, "isatty", lambda: False)() else LINES


def progress_line(group: dict) -> str:
    """One plain line: files, bytes, rate and time left of a running group."""
    seconds = max(group["running_seconds"], 1e-9)
    done, total = group["bytes_done"], group["bytes_total"]
    rate = done / seconds
    left = f", about {(total - done) / rate:.0f} s left" if rate > 0 else ""
    return (f"progress {group['group']}: {group['files_done']}/{group['files_total']} files, "
            f"{format_bytes(done)} of {format_bytes(total)}, {format_bytes(rate)}/s{left}, "
            f"running {group['running_seconds']:.0f} s ({group['strategy']}"
            + (f", attempt {group['attempt']})" if group.get("attempt", 1) > 1 else ")"))


class ProgressDisplay:
    """Shows :meth:`update`'s running groups in the chosen mode."""

    def __init__(self, mode: str, every_seconds: float = 10.0, stream=sys.stderr):
        self.mode = mode
        self.every_seconds = every_seconds
        self.stream = stream
        self._bars: dict[str, object] = {}
        self._printed_at_seconds: float | None = None  #: the first line comes one period in

    def update(self, running: list[dict], now_seconds: float) -> None:
        if self.mode == BAR:
            self._update_bars(running)
        elif self.mode == LINES and self._printed_at_seconds is None:
            self._printed_at_seconds = now_seconds
        elif self.mode == LINES and now_seconds - self._printed_at_seconds >= self.every_seconds and running:
            self._printed_at_seconds = now_seconds
            for group in running:
                print(progress_line(group), file=self.stream, flush=True)

    def _update_bars(self, running: list[dict]) -> None:
        from tqdm import tqdm

        live = {g["group"] for g in running}
        for name in [n for n in self._bars if n not in live]:
            self._bars.pop(name).close()
        for group in running:
            bar = self._bars.get(group["group"])
            if bar is None:
                bar = self._bars[group["group"]] = tqdm(total=group["bytes_total"], unit="B", unit_scale=True,
                                                        unit_divisor=1024, file=self.stream, leave=False,
                                                        dynamic_ncols=True)
            bar.set_description_str(f"{group['group']} {group['files_done']}/{group['files_total']} files",
                                    refresh=False)
            bar.update(group["bytes_done"] - bar.n)

    def clear(self) -> None:
        """Take the bars off the screen before a result line is printed."""
        for bar in self._bars.values():
            bar.clear()

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
