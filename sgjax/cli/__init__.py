"""Command-line plumbing: flags to configs, one-line errors, exit codes, signals."""
