"""Small graph edits that keep onnx-graphsurgeon's producer/consumer links consistent.

graphsurgeon's synchronized lists support item assignment but not slice assignment, so every
rewiring goes through these helpers.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs


def replace_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> int:
    """Make ``node`` read ``new`` wherever it read ``old``; returns how many slots changed."""
    changed = 0
    for index, tensor in enumerate(node.inputs):
        if tensor is old:
            node.inputs[index] = new
            changed += 1
    return changed


def replace_uses(old: gs.Tensor, new: gs.Tensor) -> int:
    """Make every consumer of ``old`` read ``new`` instead; returns how many slots changed."""
    return sum(replace_input(consumer, old, new) for consumer in list(old.outputs))


def replace_output(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    """Make ``node`` write ``new`` in the slot where it wrote ``old``."""
    for index, tensor in enumerate(node.outputs):
        if tensor is old:
            node.outputs[index] = new
