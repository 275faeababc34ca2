"""Stage 6 (after :mod:`graphopt.pipeline`, stage 5): ``graphopt tune``, the search over
passes and options, its cache, executors, fronts, reports and plots.
"""
