"""Issue 16.6: one budget rule, printed, the same in ``optimize`` and ``check``.

Before, ``optimize`` judged a quant output at 0.99 / 15 dB while ``check`` (and the README) said
0.99 / 20 dB, so the README's own int8 MiniLM (SNR 19.1 dB) passed one and failed the other.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from ..conftest import DIGITS_DATA, DIGITS_MODEL, float_input, make_model, run_cli

WIDTH = 64


def _pair(tmp_path: Path, snr_db: float) -> tuple[Path, Path, Path]:
    """A MatMul model, a copy whose weight carries noise giving every output channel an SNR of
    ``snr_db`` on the data, and the data."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((WIDTH, WIDTH)).astype(np.float32)
    x = rng.standard_normal((64, WIDTH)).astype(np.float32)
    noise = rng.standard_normal((WIDTH, WIDTH)).astype(np.float32)
    signal_power = np.sum((x @ weight) ** 2, axis=0)
    noise_power = np.sum((x @ noise) ** 2, axis=0)
    scale = np.sqrt(signal_power / noise_power / 10 ** (snr_db / 10))  # per output column
    paths = []
    for name, values in (("ref", weight), ("cand", weight + scale * noise)):
        model = make_model(
            [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
            [float_input("x", ["n", WIDTH])],
            [float_input("y", ["n", WIDTH])],
            [onnx.numpy_helper.from_array(values.astype(np.float32), "W")],
        )
        path = tmp_path / f"{name}.onnx"
        onnx.save(model, str(path))
        paths.append(path)
    data = tmp_path / "x.npz"
    np.savez(data, x=x)
    return paths[0], paths[1], data


def _budget_line(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith("budget:"))


def test_check_default_budget_is_quants_as_in_optimize(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reference, candidate, data = _pair(tmp_path, snr_db=18.0)
    code, stdout, _ = run_cli(
        ["check", str(reference), str(candidate), "--data", str(data)], capsys
    )
    assert code == 0, stdout  # 18 dB: the int8 budget (15 dB) holds; 20 dB used to fail it
    assert _budget_line(stdout) == (
        "budget: cosine ≥ 0.99, SNR ≥ 15 dB (whole tensor and worst channel) "
        "(default budget of quant)"
    )
    optimized = tmp_path / "q.onnx"
    args = ["optimize", str(DIGITS_MODEL), str(optimized), "--passes", "quant"]
    code, optimize_out, _ = run_cli([*args, "--calib-data", str(DIGITS_DATA)], capsys)
    assert code == 0
    assert _budget_line(optimize_out) == _budget_line(stdout)  # one rule, one line


def test_check_takes_the_passes_that_made_the_candidate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reference, candidate, data = _pair(tmp_path, snr_db=8.0)
    base = ["check", str(reference), str(candidate), "--data", str(data)]
    code, stdout, _ = run_cli(base, capsys)
    assert code == 1
    code, stdout, _ = run_cli([*base, "--passes", "quant,lowrank"], capsys)
    assert code == 0, stdout
    assert "cosine ≥ 0.85, SNR ≥ 5 dB" in _budget_line(stdout)
    assert "the loosest of quant, lowrank" in _budget_line(stdout)
    code, stdout, _ = run_cli([*base, "--passes", "cleanup"], capsys)
    assert code == 1 and "exact" in _budget_line(stdout)


def test_one_flag_replaces_one_figure_of_the_plans_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reference, candidate, data = _pair(tmp_path, snr_db=8.0)
    base = ["check", str(reference), str(candidate), "--data", str(data)]
    code, stdout, _ = run_cli([*base, "--passes", "lowrank", "--min-snr", "6"], capsys)
    assert code == 0, stdout  # cosine stays lowrank's 0.85, not 0.99
    assert "cosine ≥ 0.85, SNR ≥ 6 dB" in _budget_line(stdout)
