"""The reconciliation export as a script: the same code as `spendledger export`.

.venv/bin/python scripts/export.py --config config.yaml [--by customer|user|team]
    [--period day|month] [--from YYYY-MM-DD] [--to YYYY-MM-DD] [--format csv|parquet] [--output PATH|-]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spendledger.api.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["export", *sys.argv[1:]]))
