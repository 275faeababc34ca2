"""Block-wise integer weights (int4/int8): round-to-nearest and GPTQ, as plain NumPy math.

A MatMul weight ``W`` is ``[K, N]`` (K the reduction axis, the rows; N the outputs). Rules:

1. Groups run along K: ``block_size`` consecutive rows of one output column share a scale
   (and a zero point when asymmetric); ``block_size = 0`` makes one group of all K rows per
   column (per-channel). The last group of a K that is not a multiple is shorter.
2. Codes are unsigned, ``0 … 2**bits − 1``; a value is ``(code − zero) · scale``.
   Symmetric groups use the fixed zero ``2**(bits−1)`` (int4: codes −8 … 7 around it) and no
   stored zero point; asymmetric groups span ``[min(w, 0), max(w, 0)]`` with a uint zero point.
3. Symmetric scale: of ``max|w| / 8``, ``/ 7.5`` and ``/ 7`` (int4; ``2**(bits−1)``,
   ``− 0.5``, ``− 1`` in general) the one with the lowest squared error of the group is kept.
   ``/ 8`` uses the full range when the extreme value is negative and clips it by one step
   when it is positive, ``/ 7`` never clips; choosing per group keeps every group's error at
   or below the ``/ 7.5`` rule's.
4. ``search_clip``: each candidate range is also tried shrunk by the factors of
   :data:`CLIP_GRID` (1.0 down to 0.8); per group the factor with the lowest squared error
   wins, each row's error weighted by ``row_weights`` (diag XᵀX) when given. Ties keep the
   first candidate, so the choice is deterministic.
5. GPTQ (:func:`gptq`) visits the rows of W in order (or by decreasing diag H with
   ``act_order``), quantizes each row and spreads its error over the rows not yet visited with
   the upper Cholesky factor of the damped inverse Hessian (:func:`inverse_hessian_factor`),
   rows in blocks of ``block`` with lazy updates beyond the block. Inputs never seen in the
   calibration data (diag H = 0) are quantized to nearest and spread no error. Without
   ``act_order`` a group's scale is chosen from the already-updated weights when its first row
   is reached (blocks are aligned to whole groups so the group is up to date then); with
   ``act_order`` groups must stay contiguous along K (what MatMulNBits and blocked
   DequantizeLinear store), so every group's scale is chosen up front from the input weights
   ("static groups") and only the visiting order changes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import linalg

from graphopt.errors import OptionError

logger = logging.getLogger(__name__)

BITS = (4, 8)
MIN_BLOCK = 16
MAX_BLOCK = 256
CLIP_GRID = tuple(float(f) for f in np.linspace(1.0, 0.8, 9))
"""Rule 4: the shrink factors ``search_clip`` tries, largest first."""
HESSIAN_RETRIES = 3
"""How many times the damping is multiplied by 10 when the inverse Hessian has no factor."""
RTN_CHUNK_VALUES = 1 << 22
"""quantize_rtn works on column slices of about this many values (bounded temporaries)."""


@dataclass(frozen=True)
class BlockFormat:
    """How a weight is stored (rules 1 and 2)."""

    bits: int = 4
    block_size: int = 32
    """Rows per group along K: 16…256, a power of two; 0 = one group over all K per column."""
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise OptionError(f"block quantization supports {BITS} bits, not {self.bits}")
        size = self.block_size
        if size != 0 and (size < MIN_BLOCK or size > MAX_BLOCK or size & (size - 1)):
            raise OptionError(
                f"block_size must be 0 or a power of two in {MIN_BLOCK}…{MAX_BLOCK}, not {size}"
            )

    @property
    def top(self) -> int:
        """The largest code, 2**bits − 1."""
        return (1 << self.bits) - 1

    @property
    def zero(self) -> int:
        """The symmetric zero code, 2**(bits − 1)."""
        return 1 << (self.bits - 1)

    def group_rows(self, rows: int) -> int:
        """Rows per group for a K of ``rows``."""
        return self.block_size or max(rows, 1)

    def groups(self, rows: int) -> int:
        return -(-rows // self.group_rows(rows))


@dataclass
class BlockQuantized:
    """A quantized [K, N] weight: ``value = (codes − zero) · scale`` of the row's group."""

    codes: np.ndarray
    """uint8 [K, N], unsigned codes 0 … 2**bits − 1."""
    scales: np.ndarray
    """float32 [groups, N]."""
    zero_points: np.ndarray | None
    """uint8 [groups, N]; None when symmetric (the zero is 2**(bits − 1))."""
    format: BlockFormat
    rows: int

    def zeros(self) -> np.ndarray:
        """The zero code of every group, [groups, N] (the fixed one when symmetric)."""
        if self.zero_points is not None:
            return self.zero_points
        return np.full(self.scales.shape, self.format.zero, np.uint8)

    def dequantize(self) -> np.ndarray:
        """float32 [K, N]."""
        size = self.format.group_rows(self.rows)
        scales = np.repeat(self.scales, size, axis=0)[: self.rows]
        zeros = np.repeat(self.zeros(), size, axis=0)[: self.rows].astype(np.float32)
        return ((self.codes.astype(np.float32) - zeros) * scales).astype(np.float32)


def _grouped(values: np.ndarray, size: int) -> np.ndarray:
    """[K, N] → [groups, size, N], zero rows padding the last group."""
    rows, columns = values.shape
    groups = -(-rows // size)
    if groups * size == rows:
        return values.reshape(groups, size, columns)
    padded = np.zeros((groups * size, columns), values.dtype)
    padded[:rows] = values
    return padded.reshape(groups, size, columns)


def _candidates(
    grouped: np.ndarray, fmt: BlockFormat, search_clip: bool
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Rules 3 and 4: (scale, zero) pairs, each [groups, N], in the order they are preferred."""
    shrinks = CLIP_GRID if search_clip else (1.0,)
    found: list[tuple[np.ndarray, np.ndarray]] = []
    if fmt.symmetric:
        peak = np.abs(grouped).max(axis=1)
        zero = np.full(peak.shape, float(fmt.zero))
        for shrink in shrinks:
            for divisor in (fmt.zero, fmt.zero - 0.5, fmt.zero - 1):
                found.append((peak * (shrink / divisor), zero))
        return found
    low = np.minimum(grouped.min(axis=1), 0.0)
    high = np.maximum(grouped.max(axis=1), 0.0)
    for shrink in shrinks:
        scale = (high - low) * (shrink / fmt.top)
        safe = np.where(scale > 0, scale, 1.0)
        zero = np.clip(np.round(-low * shrink / safe), 0, fmt.top)
        found.append((scale, zero))
    return found


def _codes(grouped: np.ndarray, scale: np.ndarray, zero: np.ndarray, top: int) -> np.ndarray:
    """Nearest codes of ``grouped`` [G, S, N] for per-group ``scale``/``zero`` [G, N]."""
    safe = np.where(scale > 0, scale, 1.0)
    return np.clip(np.round(grouped / safe[:, None, :]) + zero[:, None, :], 0, top)


def group_params(
    grouped: np.ndarray,
    fmt: BlockFormat,
    *,
    row_weights: np.ndarray | None = None,
    search_clip: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Rules 2–4: the scale and zero code [G, N] of each group of ``grouped`` [G, S, N] with the
    lowest (row-weighted) squared error; an all-zero group gets scale 1."""
    best_scale = best_zero = best_error = None
    for scale, zero in _candidates(grouped, fmt, search_clip):
        restored = (_codes(grouped, scale, zero, fmt.top) - zero[:, None, :]) * scale[:, None, :]
        squared = (grouped - restored) ** 2
        if row_weights is not None:
            squared *= row_weights[:, :, None]
        error = squared.sum(axis=1)
        if best_error is None:
            best_scale, best_zero, best_error = scale.copy(), zero.copy(), error
            continue
        better = error < best_error
        best_scale[better] = scale[better]
        best_zero[better] = zero[better]
        best_error = np.where(better, error, best_error)
    assert best_scale is not None and best_zero is not None
    best_scale = np.where(best_scale > 0, best_scale, 1.0)
    return best_scale, best_zero


def _result(
    codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, fmt: BlockFormat
) -> BlockQuantized:
    return BlockQuantized(
        codes=codes.astype(np.uint8),
        scales=scales.astype(np.float32),
        zero_points=None if fmt.symmetric else zeros.astype(np.uint8),
        format=fmt,
        rows=int(codes.shape[0]),
    )


def quantize_rtn(
    weight: np.ndarray,
    fmt: BlockFormat,
    *,
    row_weights: np.ndarray | None = None,
    search_clip: bool = False,
) -> BlockQuantized:
    """Round-to-nearest block quantization of a [K, N] weight (rules 1–4)."""
    values = np.asarray(weight, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"expected a [K, N] weight, got shape {values.shape}")
    rows, columns = values.shape
    size = fmt.group_rows(rows)
    weights_ = None
    if row_weights is not None:
        weights_ = _grouped(np.asarray(row_weights, np.float64).reshape(-1, 1), size)[:, :, 0]
    groups = -(-rows // size)
    codes = np.empty((rows, columns), np.uint8)
    scales = np.empty((groups, columns))
    zeros = np.empty((groups, columns))
    step = max(1, RTN_CHUNK_VALUES // max(groups * size, 1))
    for start in range(0, columns, step):  # columns are independent: bounded temporaries
        span = slice(start, min(start + step, columns))
        grouped = _grouped(values[:, span], size)
        scales[:, span], zeros[:, span] = group_params(
            grouped, fmt, row_weights=weights_, search_clip=search_clip
        )
        chunk = _codes(grouped, scales[:, span], zeros[:, span], fmt.top)
        codes[:, span] = chunk.reshape(-1, chunk.shape[2])[:rows]
    return _result(codes, scales, zeros, fmt)


def gptq(
    weight: np.ndarray,
    hessian: np.ndarray,
    fmt: BlockFormat,
    *,
    act_order: bool = False,
    damp: float = 0.01,
    block: int = 128,
    search_clip: bool = False,
) -> BlockQuantized:
    """Rule 5: GPTQ of a [K, N] weight for H = XᵀX [K, K] over the layer's inputs.

    Raises :class:`numpy.linalg.LinAlgError` when H is not finite or no damping tried makes
    its inverse positive definite (:func:`inverse_hessian_factor`).
    """
    matrix = np.array(weight, dtype=np.float64)
    h = np.array(hessian, dtype=np.float64)
    rows, columns = matrix.shape
    if h.shape != (rows, rows):
        raise ValueError(f"Hessian of shape {h.shape} for a weight with {rows} rows")
    row_weight = np.clip(np.diag(h).copy(), 0.0, None)
    dead = np.diag(h) <= 0
    if dead.any():
        h[dead, :] = 0.0
        h[:, dead] = 0.0
        h[dead, dead] = 1.0
    size = fmt.group_rows(rows)
    group_count = -(-rows // size)
    scales = np.ones((group_count, columns))
    zeros = np.full((group_count, columns), float(fmt.zero))
    if act_order:
        order = np.argsort(-row_weight, kind="stable")
        grouped_weights = _grouped(row_weight.reshape(-1, 1), size)[:, :, 0]
        scales, zeros = group_params(
            _grouped(matrix, size),
            fmt,
            row_weights=grouped_weights if search_clip else None,
            search_clip=search_clip,
        )
        matrix = matrix[order]
        h = h[np.ix_(order, order)]
    else:
        order = np.arange(rows)
        block = max(size, block - block % size)  # whole groups per block
    upper = inverse_hessian_factor(h, damp, caller="gptq")
    codes = np.zeros((rows, columns))
    for start in range(0, rows, block):
        stop = min(start + block, rows)
        chunk = matrix[start:stop].copy()
        errors = np.zeros_like(chunk)
        for offset in range(stop - start):
            position = start + offset
            row = int(order[position])
            group = row // size
            if not act_order and row % size == 0:  # the group lies in this block, updated
                span = min(size, rows - row)
                weights_ = row_weight[row : row + span].reshape(1, -1) if search_clip else None
                scale, zero = group_params(
                    chunk[offset : offset + span][None],
                    fmt,
                    row_weights=weights_,
                    search_clip=search_clip,
                )
                scales[group], zeros[group] = scale[0], zero[0]
            value = chunk[offset]
            code = _codes(value[None, None], scales[group][None], zeros[group][None], fmt.top)
            code = code[0, 0]
            codes[row] = code
            restored = (code - zeros[group]) * scales[group]
            error = (value - restored) / upper[position, position]
            chunk[offset:] -= np.outer(upper[position, position:stop], error)
            errors[offset] = error
        matrix[start:stop] = chunk
        matrix[stop:] -= upper[start:stop, stop:].T @ errors
    return _result(codes, scales, zeros, fmt)


def inverse_hessian_factor(
    hessian: np.ndarray,
    damp: float,
    *,
    retries: int = HESSIAN_RETRIES,
    log: logging.Logger = logger,
    caller: str = "gptq",
) -> np.ndarray:
    """Upper Cholesky factor U of (H + λI)⁻¹ (UᵀU = (H + λI)⁻¹), λ = ``damp`` × mean diagonal,
    with λ multiplied by 10 up to ``retries`` times while the factor does not exist (logged on
    ``log`` as ``caller``). Raises :class:`numpy.linalg.LinAlgError` when H is not finite or
    every damping fails.

    Factored, inverted and factored again in one K×K buffer beside ``hessian`` (LAPACK
    potrf/potri in place), so wide layers need two Hessian-sized arrays.
    """
    if not np.all(np.isfinite(hessian)):
        raise np.linalg.LinAlgError("the Hessian has non-finite entries")
    mean = float(np.mean(np.diag(hessian)))
    buffer = np.empty(hessian.shape, dtype=np.float64, order="F")
    for attempt in range(retries + 1):
        np.copyto(buffer, hessian)
        buffer[np.diag_indices_from(buffer)] += damp * mean
        upper = _upper_inverse_factor(buffer)
        if upper is not None:
            return upper
        if attempt < retries:
            log.info(
                "%s: inverse Hessian not positive definite with damp=%g; retrying with %g",
                caller,
                damp,
                damp * 10,
            )
            damp *= 10
    raise np.linalg.LinAlgError(f"inverse Hessian not positive definite even with damp={damp:g}")


def _upper_inverse_factor(damped: np.ndarray) -> np.ndarray | None:
    """Upper U with UᵀU = damped⁻¹, computed in ``damped``'s (Fortran-ordered) memory."""
    factor, info = linalg.lapack.dpotrf(damped, lower=0, overwrite_a=1, clean=0)
    if info != 0:
        return None
    inverse, info = linalg.lapack.dpotri(factor, lower=0, overwrite_c=1)
    if info != 0:
        return None
    # potri fills the upper triangle only, which is all potrf(lower=0) reads.
    upper, info = linalg.lapack.dpotrf(inverse, lower=0, overwrite_a=1, clean=1)
    if info != 0 or not np.all(np.isfinite(upper)):
        return None
    return upper
