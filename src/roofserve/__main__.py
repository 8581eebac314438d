from roofserve.cli import main

raise SystemExit(main())
