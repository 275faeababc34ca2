"""Built-in graphopt passes, one module per pass; graphopt.registry lists them explicitly."""
