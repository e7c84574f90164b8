"""Tuning of the serving and publishing processes themselves, applied once they have started."""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Put everything alive after start-up beyond the reach of Python's cyclic garbage collector.

    Start-up leaves about 140,000 long-lived objects (modules, the app and its routes, the price
    tables), and every full collection walked them all again: 23% of the serving process's CPU at
    64 connections went to the collector (docs/benchmarks.md). Frozen, collections walk only what
    requests create, which they still reclaim as before. What start-up itself left as garbage is
    collected first; what is frozen is never freed, which for objects that live as long as the
    process is no loss.
    """
    gc.collect()
    gc.freeze()
