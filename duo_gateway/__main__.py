from duo_gateway.cli import main

raise SystemExit(main())
