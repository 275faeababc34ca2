"""Padding masks: which positions of a padded [batch, sequence] batch hold real data.

Serving code pads a batch of sentences to one length and passes an attention mask saying which
positions are real. Statistics fitted to the padding (XᵀX, channel norms, ranges) describe
inputs the model never has to answer for, so calibration counts valid positions only.

Rules:

1. A *mask input* is a rank-2 model input of integer, bool or float dtype whose values are 0 or 1
   in every feed: 1 (True) marks a real position, 0 (False) padding.
2. Found automatically (``mask_input=None``): the rank-2 inputs named like an attention mask
   (the lowercased name ends in ``mask`` and does not contain ``pad``: a *padding* mask often
   means the opposite, True = ignore) whose values are 0/1 in every feed, where another input
   has the same leading [batch, sequence] dimensions in every feed (``input_ids``,
   ``inputs_embeds``; a causal [s, s] mask has none). Exactly one such input is the mask; with
   none or several, no mask is used (logged; name one to choose).
3. ``mask_input=NAME`` names it; a name that is not a model input, an input that is not rank 2,
   or values other than 0/1 are a one-line :class:`~graphopt.errors.DataError`.
   ``mask_input=False`` (the CLI's ``--mask-input none``) turns masking off.
4. Layouts. With a run's mask of shape [b, s], a tensor may be laid out batch first (leading
   dimensions [b, s]), sequence first ([s, b]) or flattened ([b·s, …], only when b > 1 and
   s > 1); its valid rows are kept, as ``[valid, *rest]``. Which layout a tensor has is decided
   once, by :class:`LayoutDecision`, from the first run whose shape says it unambiguously: a
   shape that matches none of them decides "whole" (the tensor is never masked); a match whose
   sizes also appear on another axis (attention scores [b, heads, s, s] when heads = s; b = s)
   decides nothing, and that run uses the tensor whole. The graph can rule a layout out: when
   the tensor's inferred batch or sequence axis is a fixed size while the mask's is dynamic (a
   Conv map's channels beside a [batch, sequence] mask), the tensor is used whole. A per-channel
   axis among the batch or sequence axes leaves the tensor whole.
5. Cost: no extra ONNX Runtime run, and no copy beyond the valid rows (one boolean index);
   a run whose mask holds no padding selects nothing at all.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from graphopt.data.feeds import Feeds, InputSpec
from graphopt.errors import DataError, OptionError

logger = logging.getLogger(__name__)

MASK_NAME_SUFFIX = "mask"
"""Rule 2: an auto-detected mask input's lowercased name ends with this."""


Layout = Literal["batch_first", "sequence_first", "flattened"]
WHOLE = "whole"
"""A :class:`LayoutDecision` outcome: the tensor is never masked."""


@dataclass(frozen=True)
class RunMask:
    """The mask of one ONNX Runtime run: ``valid`` is a bool [batch, sequence] array (rule 4)."""

    valid: np.ndarray

    @property
    def padding(self) -> int:
        """Padding positions in this run."""
        return int(self.valid.size - np.count_nonzero(self.valid))

    def layout_of(self, shape: tuple[int, ...]) -> tuple[Layout | None, bool]:
        """Rule 4: the layout ``shape`` matches (None: none), and whether that is ambiguous."""
        batch, sequence = self.valid.shape
        if len(shape) >= 2 and shape[:2] == (batch, sequence):
            ambiguous = (
                batch == sequence or sequence in shape[2:] or (batch > 1 and batch in shape[2:])
            )
            return "batch_first", ambiguous
        if len(shape) >= 2 and shape[:2] == (sequence, batch):
            return "sequence_first", sequence in shape[2:] or (batch > 1 and batch in shape[2:])
        if len(shape) >= 1 and batch > 1 and sequence > 1 and shape[0] == batch * sequence:
            return "flattened", batch * sequence in shape[1:]
        return None, False

    def select(
        self, value: np.ndarray, layout: Layout, channel_axis: int | None = None
    ) -> MaskedValue:
        """Rule 4: the valid rows of ``value`` laid out as ``layout`` (which it must match), or
        ``value`` whole when its channel axis is the batch or sequence axis."""
        whole = MaskedValue(value, 0, channel_axis)
        if self.padding == 0:
            return whole
        batch, sequence = self.valid.shape
        shape = value.shape
        merged = 1 if layout == "flattened" else 2
        rows = (self.valid.T if layout == "sequence_first" else self.valid).reshape(-1)
        axis = None
        if channel_axis is not None:
            positive = channel_axis % len(shape)
            if positive < merged:  # the channel axis is the batch or sequence axis itself
                return whole
            axis = positive - merged + 1
        flat = value.reshape(batch * sequence, *shape[merged:])
        return MaskedValue(flat[rows], self.padding, axis)


@dataclass
class LayoutDecision:
    """Rule 4 for one tensor: its layout, decided once from the first unambiguous run.

    ``inferred`` is the tensor's shape from the graph (ints for fixed sizes, anything else for
    dynamic ones) and ``mask_dims`` the mask input's declared dimensions; both may be None.
    """

    inferred: Sequence[object] | None = None
    mask_dims: Sequence[object] | None = None
    decided: str | None = None

    def apply(self, mask: RunMask, value: np.ndarray, channel_axis: int | None) -> MaskedValue:
        """``value`` as statistics should see it in this run."""
        whole = MaskedValue(value, 0, channel_axis)
        layout, ambiguous = mask.layout_of(value.shape)
        if self.decided is None:
            if layout is None or self._ruled_out(layout):
                self.decided = WHOLE
            elif not ambiguous:
                self.decided = layout
            else:
                return whole  # undecided: this run counts whole
        if self.decided == WHOLE or layout != self.decided:
            return whole
        return mask.select(value, layout, channel_axis)

    def _ruled_out(self, layout: Layout) -> bool:
        """Rule 4: the graph fixes the size of an axis the mask leaves dynamic."""
        if self.inferred is None or self.mask_dims is None or len(self.mask_dims) != 2:
            return False
        inferred, mask_dims = list(self.inferred), list(self.mask_dims)

        def fixed(axis: int) -> bool:
            return axis < len(inferred) and isinstance(inferred[axis], int)

        def dynamic(dim: object) -> bool:
            return not isinstance(dim, int)

        if layout == "flattened":
            return fixed(0) and any(dynamic(dim) for dim in mask_dims)
        order = (0, 1) if layout == "batch_first" else (1, 0)
        return any(
            fixed(axis) and dynamic(mask_dims[mask_axis]) for axis, mask_axis in enumerate(order)
        )


@dataclass(frozen=True)
class MaskedValue:
    """A tensor's value as statistics should see it, the padding rows left out of it, and
    where its channel axis now is."""

    value: np.ndarray
    dropped: int
    channel_axis: int | None


@dataclass(frozen=True)
class MaskSummary:
    """What a mask input says about a data set: for the report and the log."""

    input: str
    positions: int
    padding: int

    def describe(self, left_out_of: str = "calibration and validation") -> str:
        share = 100.0 * self.padding / self.positions if self.positions else 0.0
        return (
            f"mask {self.input}: {self.padding} of {self.positions} positions ({share:.1f} %) "
            f"are padding, left out of {left_out_of}"
        )


def run_mask(feed: Mapping[str, np.ndarray], mask_input: str | None) -> RunMask | None:
    """The :class:`RunMask` of one feed (or one part of it), or None without a mask input."""
    if mask_input is None or mask_input not in feed:
        return None
    values = np.asarray(feed[mask_input])
    if values.ndim != 2:
        return None
    return RunMask(values != 0)


def resolve_mask_input(
    feeds: Feeds, specs: Sequence[InputSpec], requested: str | bool | None = None
) -> MaskSummary | None:
    """Rules 1–3: which input masks ``feeds`` (None: none), reading every feed once."""
    if requested is False or feeds.synthetic:
        return None
    by_name = {spec.name: spec for spec in specs}
    if isinstance(requested, str):
        if requested not in by_name:
            known = ", ".join(sorted(by_name)) or "none"
            raise DataError(f"--mask-input {requested}: not a model input (inputs: {known})")
        rank = _rank(by_name[requested])
        if rank is not None and rank != 2:
            raise DataError(
                f"--mask-input {requested}: a mask is a [batch, sequence] input, but "
                f"{requested} has rank {rank}"
            )
        candidates = [requested]
    elif requested is None:
        candidates = [
            spec.name
            for spec in specs
            if spec.name.lower().endswith(MASK_NAME_SUFFIX)
            and "pad" not in spec.name.lower()
            and _rank(spec) == 2
        ]
    else:
        raise OptionError(f"mask_input must be an input name, None or False, not {requested!r}")
    if not candidates:
        return None
    counts = {name: [0, 0] for name in candidates}  # positions, padding
    binary = dict.fromkeys(candidates, True)
    aligned = dict.fromkeys(candidates, True)  # rule 2: another input shares [batch, sequence]
    for feed in feeds:
        for name in candidates:
            if not binary[name] or name not in feed:
                continue
            values = np.asarray(feed[name])
            if values.ndim != 2 or not _is_binary(values):
                binary[name] = False
                continue
            aligned[name] = aligned[name] and any(
                other != name and np.shape(array)[:2] == values.shape
                for other, array in feed.items()
            )
            counts[name][0] += values.size
            counts[name][1] += int(values.size - np.count_nonzero(values))
    if isinstance(requested, str) and not binary[requested]:
        raise DataError(
            f"--mask-input {requested}: {feeds.description} holds values other than 0 and 1 "
            f"(or arrays not of rank 2) in {requested}"
        )
    found = [
        name for name in candidates if binary[name] and (requested is not None or aligned[name])
    ]
    if len(found) != 1:
        if len(found) > 1:
            logger.info(
                "calibration: several inputs look like attention masks (%s); none is used; "
                "name one with --mask-input",
                ", ".join(found),
            )
        return None
    name = found[0]
    positions, padding = counts[name]
    summary = MaskSummary(name, positions, padding)
    logger.info("calibration: %s", summary.describe())
    return summary


def _rank(spec: InputSpec) -> int | None:
    """The input's declared rank, or None when the model does not say."""
    return None if spec.shape is None else len(spec.shape)


def _is_binary(values: np.ndarray) -> bool:
    if values.dtype == np.bool_:
        return True
    if values.dtype.kind not in "iuf":
        return False
    return bool(np.all((values == 0) | (values == 1)))
