"""Shared by the benchmark scripts: the machine's description and a section of docs/benchmarks.md."""

from __future__ import annotations

import os
import platform
import re
from datetime import UTC, datetime
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"


def machine(pg_version: str) -> str:
    cpu = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    mem = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    return (
        f"`nproc` {len(os.sched_getaffinity(0))}, {cpu[1] if cpu else '?'}, "
        f"{int(mem[1] if mem else 0) / 2**20:.1f} GiB RAM, Python {platform.python_version()}"
        + (f", PostgreSQL {pg_version}" if pg_version else "")
    )


def write_section(title: str, command: str, body: str, pg_version: str) -> None:
    """Replace (or append) the section `## {title}` of docs/benchmarks.md, leaving the others."""
    text = DOC.read_text() if DOC.exists() else f"# Benchmarks\n\nMachine: {machine(pg_version)}.\n"
    section = (
        f"## {title}\n\nRun {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {machine(pg_version)}:\n\n"
        f"```\n{command}\n```\n\n{body.strip()}\n"
    )
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.M | re.S)
    text = (
        pattern.sub(lambda _: section + "\n", text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + section
    )
    DOC.write_text(text)
