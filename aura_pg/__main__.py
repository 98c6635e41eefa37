"""``python -m aura_pg``: the ``aura-pg`` command."""

import sys

from aura_pg.cli import main

sys.exit(main())
