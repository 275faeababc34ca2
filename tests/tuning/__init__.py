"""Stage 6 (graphopt.tuning): graphopt tune."""
