"""tools.bench_sequential: its rows come in pairs with and without the engine."""

from __future__ import annotations

import pytest

from tools import bench_sequential as bench


def test_every_pass_has_a_row_with_and_without_the_engine() -> None:
    pairs: dict[str, list[str]] = {}
    for name, (pair, _, _) in bench.ROWS.items():
        pairs.setdefault(pair, []).append(name)
    assert set(pairs) == {
        "lowrank 0.75",
        "lowrank 0.5",
        "sparsify 50 %",
        "sparsify 2:4",
        "int4 block 32",
        "int4 block 128",
    }
    for names in pairs.values():
        assert any("sequential" in name for name in names)
        assert any("sequential" not in name for name in names)


def test_markdown_names_the_fit_of_each_row() -> None:
    row = {
        "name": "int4 b32 gptq",
        "pair": "int4 block 32",
        "accuracy": {"cosine_mean": 0.99451, "cosine_min": 0.9873, "nn_agreement": 0.95},
        "size_ratio": 0.2,
        "seconds": 18.0,
    }
    text = bench.markdown([row], {"machine": "test", "calibration": 512})
    assert "| int4 block 32 | int4 b32 gptq | 0.9945 | 0.9873 | 0.950 | 0.200× | 18 |" in text


def test_unknown_rows_are_refused() -> None:
    with pytest.raises(SystemExit):
        bench.main(["--rows", "nope", "--out-dir", "/nonexistent"])
