"""Experiment tracking: the tracker interface (a no-op one everywhere tracking is off), MLflow,
the run directory's metrics file, its loss-curve plot and the rank-0 progress display."""
