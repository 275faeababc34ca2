"""Stage 3, writing and running passes: the Pass contract and context, option schemas,
the registry and the manager that orders and runs passes, and the numerics several
built-in passes share (Q/DQ arithmetic, SVD, weight selection).
"""
