from hubgate.cli import main

raise SystemExit(main())
