"""Freezing the start-up heap (api/runtime.py): in a process of its own, as the server does it."""

from __future__ import annotations

import subprocess
import sys

# Start-up objects become frozen; garbage made afterwards (a request's reference cycles) is still
# collected, and what start-up left as garbage was collected rather than frozen.
_SCRIPT = """
import gc, weakref
from spendledger.api.runtime import freeze_startup_heap

class Node:
    pass

def cycle():
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)

left_by_start_up = cycle()
kept = Node()
freeze_startup_heap()
assert left_by_start_up() is None, "start-up garbage was frozen, not collected"
assert gc.get_freeze_count() > 0
assert not any(o is kept for o in gc.get_objects()), "a start-up object is still walked"
made_by_a_request = cycle()
assert made_by_a_request() is not None
gc.collect()
assert made_by_a_request() is None, "garbage made after the freeze is no longer collected"
print("ok")
"""


def test_freeze_startup_heap_keeps_collecting_what_comes_after() -> None:
    done = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
