from spendledger.api.cli import main

raise SystemExit(main())
