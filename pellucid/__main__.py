"""`python -m pellucid` is the `pellucid` console script."""

from pellucid.cli import main

raise SystemExit(main())
