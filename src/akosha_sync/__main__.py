from akosha_sync.cli import main

raise SystemExit(main())
