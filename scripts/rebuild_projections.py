"""Rebuild the projections from the event log (same as `spendledger rebuild`).

.venv/bin/python scripts/rebuild_projections.py [--config config.yaml] [--verify-only]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spendledger.api.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["rebuild", *sys.argv[1:]]))
