"""The front door: the ``zeroforge`` command (cli.py and commands/), and starting runs on this
machine (local.py), a hostfile cluster (hostfile.py) or Slurm (slurm.py)."""
