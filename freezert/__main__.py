"""``python -m freezert``: the command line (see ``freezert.cli``)."""

from .cli import main

raise SystemExit(main())
