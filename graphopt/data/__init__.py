"""Stage 2, the data: feeds from .npz files, folders, iterables and readers, synthesized
inputs, and the streaming calibration collector passes fit their statistics with.
"""
