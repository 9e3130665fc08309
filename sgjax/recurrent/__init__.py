"""Recurrent DNI runs: configuration, compiled programs for the copy tasks and character
language modelling, and the host loop with records and checkpoints (``experiments/rnn.py``)."""
