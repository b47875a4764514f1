"""`python -m resumax` runs the `resumax` command."""

from resumax.cli import main

raise SystemExit(main())
