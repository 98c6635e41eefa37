"""``python -m aura_pg.cli``: the ``aura-pg`` command."""

import sys

from aura_pg.cli import main

sys.exit(main())
