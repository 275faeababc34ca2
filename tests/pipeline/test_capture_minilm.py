"""`graphopt capture` on a real program: MiniLM served by models.embed_app (issue 18)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from graphopt.pipeline import optimize

from ..conftest import sha256_of

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_captured_feeds_calibrate_like_the_hand_made_folder(
    minilm_torchscript: Path, tmp_path: Path
) -> None:
    from models.embed_app import batches, documentation_sentences

    captured = tmp_path / "captured"
    command = [sys.executable, "-m", "models.embed_app", "--model", str(minilm_torchscript)]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "graphopt",
            "capture",
            "--out",
            str(captured),
            "--model",
            str(minilm_torchscript),
            "--",
            *command,
            "--docs",
            "24",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "3 feeds" in done.stdout and f"--calib-data {captured}" in done.stdout
    hand_made = tmp_path / "hand_made"
    hand_made.mkdir()
    expected = list(batches(documentation_sentences(24), 8))
    for index, feed in enumerate(expected):
        np.savez(hand_made / f"{index:04d}.npz", **feed)
    recorded = [dict(np.load(path)) for path in sorted(captured.glob("*.npz"))]
    assert len(recorded) == len(expected)
    for got, want in zip(recorded, expected, strict=True):
        assert got.keys() == want.keys()
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
    assert len({feed["input_ids"].shape[1] for feed in recorded}) > 1, "dynamic padding"
    outputs = {}
    for label, data in (("captured", captured), ("hand_made", hand_made)):
        outputs[label] = tmp_path / f"{label}.onnx"
        report = optimize(
            minilm_torchscript,
            outputs[label],
            ["lowrank"],
            options={"lowrank": {"ratio": 0.75}},
            data=data,
            validate=False,
        )
        assert report.calibration_mask and "attention_mask" in report.calibration_mask
    assert sha256_of(outputs["captured"]) == sha256_of(outputs["hand_made"])
