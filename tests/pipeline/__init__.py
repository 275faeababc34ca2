"""Stage 5 (graphopt.pipeline): whole runs, files and faults, the model zoo."""
