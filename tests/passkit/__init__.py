"""Stage 3 (graphopt.passkit): the pass contract, registry and manager."""
