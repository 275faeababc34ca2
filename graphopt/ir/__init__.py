"""Stage 1, the model itself: loading and saving (external data, atomic publishing,
temporary files), ONNX Runtime sessions, normalization, constant folding, graph edits, opsets
and the summary behind ``graphopt inspect``.
"""
