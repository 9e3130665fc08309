"""Training runs: configuration, the period loop and its engines, checkpoints, records."""
