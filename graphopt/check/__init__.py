"""Stage 4, checking a result: the validation engine, the ``graphopt check`` gate,
per-tensor localisation, bisection and latency measurement.
"""
