"""``python -m fsmoe ...`` runs the ``fsmoe`` command (see :mod:`fsmoe.cli`)."""

from fsmoe.cli import main

raise SystemExit(main())
