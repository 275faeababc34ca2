"""The builds :mod:`tools.benchmark` measures, each called in a fresh process by
:func:`tools.bench_common.run_worker`.

Every builder has the signature ``(source, target, calib, **options) -> dict`` (paths as strings;
``calib`` is an ``.npz`` or a folder of ``.npz`` feeds), writes ``target`` and returns a small
JSON-able description of what it did. Anchors are called with their documented defaults; models
whose weights live in external data are written with external data too.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
from onnx import external_data_helper

from tools.bench_common import BATCH, FeedReader


def uses_external_data(path: str | Path) -> bool:
    """True when any initializer of the model file lives in an external data file."""
    proto = onnx.load(str(path), load_external_data=False)
    return any(external_data_helper.uses_external_data(t) for t in proto.graph.initializer)


def _save(proto: onnx.ModelProto, target: str, external: bool) -> None:
    if external:
        onnx.save(
            proto,
            target,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=Path(target).name + ".data",
        )
    else:
        onnx.save(proto, target)


def _summarize_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """Pass stats without the long per-layer lists."""
    return {k: v for k, v in stats.items() if not isinstance(v, list | dict) or len(str(v)) < 200}


def graphopt_optimize(
    source: str,
    target: str,
    calib: str,
    passes: list[str],
    options: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """``graphopt.optimize`` without validation (the benchmark evaluates the output itself)."""
    import graphopt

    report = graphopt.optimize(
        source, target, passes, data=calib, options=options or {}, validate=False
    )
    return {
        "plan": report.plan,
        "passes": [
            {
                "name": record.name,
                "modified": record.modified,
                "seconds": record.seconds,
                "stats": _summarize_stats(record.stats),
            }
            for record in report.run.records
        ],
    }


def ort_quantize_dynamic(
    source: str, target: str, calib: str, per_channel: bool = False
) -> dict[str, Any]:
    """ONNX Runtime ``quantize_dynamic`` (int8 weights, per-batch activation scales)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    del calib
    quantize_dynamic(
        source,
        target,
        per_channel=per_channel,
        weight_type=QuantType.QInt8,
        use_external_data_format=uses_external_data(source),
    )
    return {"per_channel": per_channel}


def ort_quantize_static(source: str, target: str, calib: str) -> dict[str, Any]:
    """ONNX Runtime ``quantize_static`` with its defaults, calibrated on ``calib``."""
    from onnxruntime.quantization import quantize_static

    reader = FeedReader(calib, BATCH)
    quantize_static(source, target, reader, use_external_data_format=uses_external_data(source))
    return {"calibration_feeds": len(reader.feeds)}


def occ_fp16(source: str, target: str, calib: str) -> dict[str, Any]:
    """onnxconverter-common ``convert_float_to_float16(keep_io_types=True)``."""
    from onnxconverter_common.float16 import convert_float_to_float16

    del calib
    return _fp16_anchor(convert_float_to_float16, source, target)


def ort_transformers_fp16(source: str, target: str, calib: str) -> dict[str, Any]:
    """ONNX Runtime's ``onnxruntime.transformers.float16`` converter, ``keep_io_types=True``."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    del calib
    return _fp16_anchor(convert_float_to_float16, source, target)


def _fp16_anchor(
    convert: Callable[..., onnx.ModelProto], source: str, target: str
) -> dict[str, Any]:
    """Load ``source`` whole, convert it with ``keep_io_types=True``, save it like the source."""
    external = uses_external_data(source)
    _save(convert(onnx.load(source), keep_io_types=True), target, external)
    return {}


def olive_pass(
    source: str,
    target: str,
    calib: str,
    pass_name: str,
    pass_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Olive's ``run-pass`` with one pass (olive-ai, when installed), defaults + ``pass_config``.

    Runs in a scratch folder beside ``target`` (Olive keeps a cache in the working directory)
    and moves the resulting model to ``target``.
    """
    from olive.cli.launcher import main as olive_main

    del calib
    scratch = Path(target).with_name(Path(target).stem + "_olive")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    here = Path.cwd()
    os.chdir(scratch)
    try:
        olive_main(
            [
                "run-pass",
                "--pass-name",
                pass_name,
                "-m",
                str(Path(here, source)),
                "-o",
                str(scratch / "out"),
                "--disable_telemetry",
                *(["--pass-config", json.dumps(pass_config)] if pass_config else []),
            ],
            called_as_console_script=False,
        )
    finally:
        os.chdir(here)
    produced = sorted((scratch / "out").glob("*.onnx"))
    if not produced:
        raise RuntimeError(f"Olive {pass_name} wrote no .onnx file")
    proto = onnx.load(str(produced[0]))
    _save(proto, target, uses_external_data(source))
    shutil.rmtree(scratch, ignore_errors=True)
    return {"pass": pass_name, "pass_config": pass_config or {}}
