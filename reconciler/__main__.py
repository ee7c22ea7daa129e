"""Allow `python -m reconciler` where the `spos` script is not on PATH."""

from reconciler.cli import main

raise SystemExit(main())
