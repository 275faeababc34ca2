"""Padding masks: which positions of a padded [batch, sequence] batch hold real data.

Serving code pads a batch of sentences to one length and passes an attention mask saying which
positions are real. Statistics fitted to the padding (XᵀX, channel norms, ranges) describe
inputs the model never has to answer for, so calibration counts valid positions only.

Rules:

1. A *mask input* is a rank-2 model input of integer, bool or float dtype whose values are 0 or 1
   in every feed: 1 (True) marks a real position, 0 (False) padding.
2. Found automatically (``mask_input=None``): the inputs named like an attention mask (the
   lowercased name ends in ``mask`` and does not contain ``pad``: a *padding* mask often means
   the opposite, True = ignore) whose values are 0/1 in every feed. Exactly one such input is
   the mask; with none or several, no mask is used (logged; name one to choose).
3. ``mask_input=NAME`` names it; a name that is not a model input, an input that is not rank 2,
   or values other than 0/1 are a one-line :class:`~graphopt.errors.DataError`.
   ``mask_input=False`` (the CLI's ``--mask-input none``) turns masking off.
4. Layouts, decided per tensor and per run from the shapes alone: with the run's mask of shape
   [b, s], a tensor whose leading dimensions are [b, s] (batch first) or [s, b] (sequence
   first; only when s ≠ b) keeps the rows of valid positions, as ``[valid, *rest]``; a tensor
   whose leading dimension is b·s (a flattened [b·s, hidden] layout; only when b > 1 and
   s > 1) keeps the valid rows likewise. Every other tensor is used whole. A per-channel axis
   among the leading dimensions (the batch or sequence axis itself) leaves the tensor whole.
5. Cost: no extra ONNX Runtime run, and no copy beyond the valid rows (one boolean index);
   a run whose mask holds no padding selects nothing at all.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from graphopt.data.feeds import Feeds, InputSpec
from graphopt.errors import DataError, OptionError

logger = logging.getLogger(__name__)

MASK_NAME_SUFFIX = "mask"
"""Rule 2: an auto-detected mask input's lowercased name ends with this."""


@dataclass(frozen=True)
class RunMask:
    """The mask of one ONNX Runtime run: ``valid`` is a bool [batch, sequence] array (rule 4)."""

    valid: np.ndarray

    @property
    def padding(self) -> int:
        """Padding positions in this run."""
        return int(self.valid.size - np.count_nonzero(self.valid))

    def select(self, value: np.ndarray, channel_axis: int | None = None) -> MaskedValue:
        """Rule 4: the valid rows of ``value``, or ``value`` whole when its layout is not
        [b, s, …], [s, b, …] or [b·s, …] (or its channel axis is one of those axes)."""
        whole = MaskedValue(value, 0, channel_axis)
        if self.padding == 0:
            return whole
        batch, sequence = self.valid.shape
        shape = value.shape
        if len(shape) >= 2 and shape[:2] == (batch, sequence):
            rows, merged = self.valid.reshape(-1), 2
        elif len(shape) >= 2 and batch != sequence and shape[:2] == (sequence, batch):
            rows, merged = self.valid.T.reshape(-1), 2
        elif len(shape) >= 1 and batch > 1 and sequence > 1 and shape[0] == batch * sequence:
            rows, merged = self.valid.reshape(-1), 1
        else:
            return whole
        axis = None
        if channel_axis is not None:
            positive = channel_axis % len(shape)
            if positive < merged:  # the channel axis is the batch or sequence axis itself
                return whole
            axis = positive - merged + 1
        flat = value.reshape(batch * sequence, *shape[merged:])
        return MaskedValue(flat[rows], self.padding, axis)


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

    def describe(self) -> str:
        share = 100.0 * self.padding / self.positions if self.positions else 0.0
        return (
            f"mask {self.input}: {self.padding} of {self.positions} positions ({share:.1f} %) "
            "are padding, left out of calibration statistics"
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
        if len(by_name[requested].shape) != 2:
            raise DataError(
                f"--mask-input {requested}: a mask is a [batch, sequence] input, but "
                f"{requested} has rank {len(by_name[requested].shape)}"
            )
        candidates = [requested]
    elif requested is None:
        candidates = [
            spec.name
            for spec in specs
            if len(spec.shape) == 2
            and spec.name.lower().endswith(MASK_NAME_SUFFIX)
            and "pad" not in spec.name.lower()
        ]
    else:
        raise OptionError(f"mask_input must be an input name, None or False, not {requested!r}")
    if not candidates:
        return None
    counts = {name: [0, 0] for name in candidates}  # positions, padding
    binary = dict.fromkeys(candidates, True)
    for feed in feeds:
        for name in candidates:
            if not binary[name] or name not in feed:
                continue
            values = np.asarray(feed[name])
            if values.ndim != 2 or not _is_binary(values):
                binary[name] = False
                continue
            counts[name][0] += values.size
            counts[name][1] += int(values.size - np.count_nonzero(values))
    if isinstance(requested, str) and not binary[requested]:
        raise DataError(
            f"--mask-input {requested}: {feeds.description} holds values other than 0 and 1 "
            f"(or arrays not of rank 2) in {requested}"
        )
    found = [name for name in candidates if binary[name]]
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


def _is_binary(values: np.ndarray) -> bool:
    if values.dtype == np.bool_:
        return True
    if values.dtype.kind not in "iuf":
        return False
    return bool(np.all((values == 0) | (values == 1)))
