"""Stage 4 (graphopt.check): validation, the gate and its reports."""
