"""``python -m zeroforge.launch ...`` is the ``zeroforge`` command; launchers start every rank
of a run this way (``deepspeed --module zeroforge.launch train ...``)."""

import sys

from zeroforge.launch.cli import main

sys.exit(main())
