"""Low-rank factorization numerics for the ``lowrank`` pass: ranks, (whitened) SVD, factors.

Rules (GUIDE §3 "Low rank"):

1. ``W (K×N) ≈ A (K×r) · B (r×N)`` saves parameters and FLOPs only when ``r < K·N / (K+N)``
   (the break-even rank); :func:`max_rank` is the largest rank below it.
2. Plain mode factors ``W`` itself. Whitened mode (SVD-LLM) factors ``M = Lᵀ W`` where
   ``XᵀX + εI = L Lᵀ`` (Cholesky; ε starts at 1e-6 of the mean diagonal and grows tenfold until
   the factorization succeeds), so that truncating singular value σ_i of ``M`` costs exactly σ_i²
   of output error ‖XW − XW'‖² on the calibration activations X; the factors are then
   ``A = L⁻ᵀ U_r √Σ_r`` and ``B = √Σ_r V_rᵀ``.
3. Only the leading components a caller may keep are computed: a randomized SVD (Gaussian sketch
   of rank + 16 columns, two power iterations with QR re-orthonormalization, seeded) when that
   is under half the smaller dimension and that dimension is at least 1024, else LAPACK's full
   SVD. Matrices with more than 4M
   entries are decomposed in float32, smaller ones in float64.
4. Signs are fixed (the largest-magnitude entry of each right singular vector is positive) so
   results do not depend on LAPACK's arbitrary choice.
5. √Σ is split across both factors, then each rank component is rescaled so that column i of
   A and row i of B have the same largest magnitude (an exact rebalancing: A·D · D⁻¹·B = A·B),
   so neither factor's range explodes before quantization or fp16.
6. Ranks derived from a ratio are rounded to the nearest multiple of ``multiple`` (halves up,
   at least one multiple), ranks derived from an energy target up to the next one, as long as
   that stays below break-even; otherwise the unrounded rank is kept.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy import linalg

logger = logging.getLogger(__name__)

OVERSAMPLE = 16
RANDOMIZED_MIN_DIM = 1024
POWER_ITERATIONS = 2
FLOAT64_MAX_ENTRIES = 4 * 1024 * 1024
JITTER_START = 1e-6
JITTER_TRIES = 8


def break_even_rank(rows: int, cols: int) -> float:
    """Rule 1: the rank at which the two factors hold as many parameters as the matrix."""
    return rows * cols / (rows + cols)


def max_rank(rows: int, cols: int) -> int:
    """Rule 1: the largest integer rank strictly below break-even (0 when there is none)."""
    return max(math.ceil(break_even_rank(rows, cols)) - 1, 0)


def round_rank(rank: int, rows: int, cols: int, multiple: int, *, up: bool = False) -> int:
    """Rule 6: to the nearest multiple (halves up), or to the next one with ``up``."""
    limit = max_rank(rows, cols)
    if multiple <= 1 or rank <= 0:
        return min(rank, limit)
    steps = math.ceil(rank / multiple) if up else math.floor(rank / multiple + 0.5)
    rounded = max(multiple, steps * multiple)
    while rounded > limit and rounded - multiple >= multiple:
        rounded -= multiple
    return rounded if rounded <= limit else min(rank, limit)


def rank_for_ratio(ratio: float, rows: int, cols: int, multiple: int) -> int:
    """The rank whose factors hold ``ratio`` of the matrix's parameters (rounded, rule 6)."""
    rank = max(int(ratio * break_even_rank(rows, cols)), 1)
    return round_rank(rank, rows, cols, multiple)


def rank_for_energy(spectrum: Spectrum, energy: float, multiple: int) -> int:
    """The smallest rank keeping ``energy`` of the (whitened) spectral energy, rounded up to a
    multiple where that stays below break-even (so the target is always met)."""
    kept = np.cumsum(spectrum.singular_values.astype(np.float64) ** 2) / spectrum.total_energy
    rank = int(np.searchsorted(kept, energy - 1e-12) + 1)
    rows, cols = spectrum.shape
    if rank > max_rank(rows, cols):
        return rank  # the caller refuses it: keeping that much energy is not worth splitting
    rounded = round_rank(rank, rows, cols, multiple, up=True)
    return rounded if rounded >= rank else rank


@dataclass
class Spectrum:
    """The leading singular triplets of a (possibly whitened) weight.

    ``total_energy`` is ‖M‖_F², so the energy a truncation drops is known even when only the
    leading components were computed.
    """

    left: np.ndarray
    singular_values: np.ndarray
    right: np.ndarray
    total_energy: float
    shape: tuple[int, int]
    whitening: np.ndarray | None = None
    """Lower-triangular L with XᵀX + εI = L Lᵀ (whitened mode), else None."""

    @property
    def computed(self) -> int:
        return int(self.singular_values.size)

    def relative_error(self, rank: int) -> float:
        """‖M − M_r‖_F / ‖M‖_F: in whitened mode, the relative output error on the data."""
        kept = float(np.sum(self.singular_values[:rank].astype(np.float64) ** 2))
        dropped = max(self.total_energy - kept, 0.0)
        return math.sqrt(dropped / self.total_energy) if self.total_energy > 0 else 0.0


def whitening_factor(gram: np.ndarray, damping: float = JITTER_START) -> np.ndarray:
    """Rule 2: lower-triangular L with ``gram + εI = L Lᵀ``.

    Works in one K×K buffer beside ``gram`` (LAPACK factors it in place), so a 16k-wide
    input needs two Gram-sized arrays, not five.
    """
    gram = np.asarray(gram, dtype=np.float64)
    diagonal = np.diagonal(gram)
    scale = float(np.mean(diagonal))
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError("activation statistics are all zero")
    jitter = max(damping, JITTER_START) * scale
    buffer = np.empty_like(gram)
    for _ in range(JITTER_TRIES):
        np.copyto(buffer, gram)
        buffer[np.diag_indices_from(buffer)] += jitter
        try:
            # buffer.T is Fortran-ordered, so LAPACK works in place; the symmetric matrix's
            # upper factor U (A = UᵀU) read back in C order is L = Uᵀ.
            upper = linalg.cholesky(buffer.T, lower=False, overwrite_a=True, check_finite=False)
        except linalg.LinAlgError:
            jitter *= 10
            continue
        return np.ascontiguousarray(upper.T)
    raise ValueError("activation Gram matrix is not positive definite even with jitter")


def decompose(
    weight: np.ndarray,
    keep: int,
    *,
    gram: np.ndarray | None = None,
    damping: float = JITTER_START,
    seed: int = 0,
) -> Spectrum:
    """The leading ``keep`` singular triplets of ``weight`` (or of ``Lᵀ W`` given XᵀX)."""
    rows, cols = weight.shape
    dtype = np.float64 if rows * cols <= FLOAT64_MAX_ENTRIES else np.float32
    matrix = np.asarray(weight, dtype=dtype)
    whitening = None
    if gram is not None:
        whitening = whitening_factor(gram, damping)
        matrix = (whitening.T.astype(dtype) @ matrix).astype(dtype, copy=False)
    total_energy = float(np.einsum("ij,ij->", matrix, matrix, dtype=np.float64))
    keep = max(1, min(keep, rows, cols))
    if min(rows, cols) >= RANDOMIZED_MIN_DIM and keep + OVERSAMPLE < min(rows, cols) // 2:
        left, values, right = _randomized_svd(matrix, keep, seed)
    else:
        left, values, right = np.linalg.svd(matrix, full_matrices=False)
        left, values, right = left[:, :keep], values[:keep], right[:keep]
    left, right = _fix_signs(left, right)
    return Spectrum(left, values, right, total_energy, (rows, cols), whitening)


def factors(spectrum: Spectrum, rank: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Rules 2 and 5: A (K×rank) and B (rank×N) with A·B the rank-``rank`` approximation."""
    if rank > spectrum.computed:
        raise ValueError(f"rank {rank} exceeds the {spectrum.computed} computed components")
    root = np.sqrt(spectrum.singular_values[:rank].astype(np.float64))
    first = spectrum.left[:, :rank].astype(np.float64) * root
    # B is the larger factor of a wide matrix: it stays in the spectrum's precision (float64
    # up to 4M entries, rule 3), so a 2048 × 32000 head needs no float64 copies of it.
    right = spectrum.right[:rank]
    second = right * root[:, None].astype(right.dtype)
    if spectrum.whitening is not None:
        first = linalg.solve_triangular(
            spectrum.whitening, first, trans="T", lower=True, check_finite=False
        )
    first, second = balance(first, second)
    return first.astype(dtype), second.astype(dtype, copy=False)


def balance(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rule 5: scale each component so A's column and B's row have the same peak (A·B kept)."""
    first_peak = np.abs(first).max(axis=0)
    second_peak = np.abs(second).max(axis=1)
    usable = (first_peak > 0) & (second_peak > 0)
    scale = np.ones(first.shape[1])
    scale[usable] = np.sqrt(second_peak[usable] / first_peak[usable])
    return first * scale, second / scale[:, None].astype(second.dtype)


def _randomized_svd(
    matrix: np.ndarray, keep: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rule 3: Halko–Martinsson–Tropp range finder with power iterations."""
    rng = np.random.default_rng(seed)
    sketch = rng.standard_normal((matrix.shape[1], keep + OVERSAMPLE)).astype(matrix.dtype)
    basis, _ = np.linalg.qr(matrix @ sketch)
    for _ in range(POWER_ITERATIONS):
        back, _ = np.linalg.qr(matrix.T @ basis)
        basis, _ = np.linalg.qr(matrix @ back)
    small = basis.T @ matrix
    left, values, right = np.linalg.svd(small, full_matrices=False)
    return (basis @ left)[:, :keep], values[:keep], right[:keep]


def _fix_signs(left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rule 4."""
    pivots = np.argmax(np.abs(right), axis=1)
    signs = np.sign(right[np.arange(right.shape[0]), pivots])
    signs[signs == 0] = 1
    return left * signs, right * signs[:, None]
