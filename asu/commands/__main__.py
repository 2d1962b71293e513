"""``python -m asu.commands <subcommand> ...``: the ``asu`` command, for launchers that run a module
(``accelerate launch -m asu.commands unlearn ...``)."""

import sys

from asu.commands import main

sys.exit(main())
