"""`spendledger rebuild [--verify-only]`: replay the log into fresh projections, compare, swap."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from spendledger.projections.rebuild import rebuild, render


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], config_help: str, data_dir_help: str
) -> None:
    parser = sub.add_parser("rebuild", help="rebuild the projections from the event log, compare, swap")
    parser.add_argument("--config", help=config_help)
    parser.add_argument("--data-dir", help=data_dir_help)
    parser.add_argument("--verify-only", action="store_true", help="compare only: change nothing")


def run_rebuild(database_url: str, verify_only: bool) -> int:
    """Rebuild with a progress bar (events/s); exit code 1 if the projections differed."""
    started = time.perf_counter()
    columns = (
        TextColumn("[bold]replaying the log"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task("replay", total=None, rate="")

        def progress(done: int, total: int) -> None:
            rate = done / max(time.perf_counter() - started, 1e-9)
            bar.update(task, completed=done, total=total, rate=f"{rate:,.0f} events/s")

        report = asyncio.run(rebuild(database_url, verify_only=verify_only, progress=progress))
    print(render(report), file=sys.stderr if not report.equal else sys.stdout)
    return 0 if report.equal else 1
