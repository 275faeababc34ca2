"""The command line (graphopt.cli) and its progress display."""
