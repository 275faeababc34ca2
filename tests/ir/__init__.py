"""Stage 1 (graphopt.ir): model I/O, external data, normalization, memory and scale."""
