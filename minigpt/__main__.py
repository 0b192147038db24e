"""`python -m minigpt ...` (the entrypoint used with `ray job submit`)."""

import sys

from minigpt.cli import main

sys.exit(main())
