"""Built-in graphopt passes, one module per pass; :mod:`graphopt.passkit.registry` lists them
explicitly."""
