from meswitch.cli import main

raise SystemExit(main())
