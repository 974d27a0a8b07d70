from throttler.cli import main

raise SystemExit(main())
