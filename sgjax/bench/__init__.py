"""The benchmark: programs of vmapped runs, presets, sweeps, timing, tables and plots."""
