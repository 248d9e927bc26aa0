"""``python -m dymu`` is the ``dymu`` command."""

from dymu.cli.main import main

raise SystemExit(main())
