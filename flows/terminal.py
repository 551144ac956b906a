"""What ``medpipe run`` shows in the terminal: a progress bar while it works, a summary at the end."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import progress

_STYLE = {"ok": "green", "failed": "bold red", "skipped": "yellow", "deferred": "cyan", "interrupted": "magenta"}


class RunDisplay:
    """Subscribe to run events and draw them; a context manager around the run."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=self.console, transient=False,
                            refresh_per_second=2)  # a bar of studies: more would cost the run CPU
        self.task = self.bar.add_task("starting Prefect and Dask", total=None)

    def __enter__(self) -> "RunDisplay":
        self.bar.start()
        self._unsubscribe = progress.subscribe(self._on_event)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._unsubscribe()
        self.bar.stop()

    def note(self, text: str) -> None:
        self.console.log(text)

    def fail(self, text: str) -> None:
        self.console.print(f"[bold red]{text}")

    def _on_event(self, event: str, data: dict[str, Any]) -> None:
        if event == "cluster" and data.get("dashboard"):
            self.console.log(f"Dask dashboard: {data['dashboard']}")
        elif event == "planned":
            self.bar.update(self.task, description="studies", total=data["total"], completed=0)
        elif event == "study":
            self.bar.advance(self.task)
            status = data["status"]
            detail = _short(data.get("error") or data.get("reason") or data.get("findings"))
            self.console.log(f"[{_STYLE.get(status, '')}]{status:7}[/] {data['study_key']} "
                             f"{data.get('modality') or ''} {detail}")

    def summary(self, run: dict[str, Any], out: Path) -> None:
        table = Table(title=f"medpipe run {run['run_id']} ({run.get('seconds', 0):.1f} s)")
        for col in ("study", "modality", "status", "seconds", "findings / error"):
            table.add_column(col)
        for s in run["studies"]:
            table.add_row(s["study_key"], s.get("modality") or "", f"[{_STYLE.get(s['status'], '')}]{s['status']}",
                          f"{s.get('seconds', 0):.1f}", _short(s.get("error") or s.get("reason") or s.get("findings")))
        self.console.print(table)
        counts = run.get("counts", {})
        self.console.print(f"ok {counts.get('ok', 0)}, failed {counts.get('failed', 0)}, "
                           f"skipped {counts.get('skipped', 0)}"
                           + (f", deferred {counts['deferred']}" if counts.get("deferred") else "")
                           + f"; {len(run.get('issues', []))} file problem(s). "
                           f"Results: {out / 'run.json'}, {out / 'run.html'}")
        failed = [s for s in run["studies"] if s["status"] == "failed"]
        if failed:
            print("failed studies:", file=sys.stderr)
            for s in failed:
                print(f"  {s['study_key']}: {s['error']}", file=sys.stderr)


def _short(text: str | None, limit: int = 160) -> str:
    """One table cell's worth of text; run.json and the study's report keep the whole of it."""
    text = (text or "").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"
