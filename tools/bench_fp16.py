"""float16 benchmark: graphopt ``fp16`` against onnxconverter-common and ONNX Runtime's converter.

    python -m tools.bench_fp16 [--out-dir models/build/bench_fp16] [--skip-large]

Models: MiniLM (TorchScript and dynamo exports in ``models/build``; see models/README.md), the
digits CNN, a small model with If and Loop (outer-scope reads in both), and a deep MLP of random
weights over 2 GB stored as external data (generated in a temporary folder, deleted afterwards).
Each converter runs in a fresh process, so its wall time and peak RSS (``VmHWM``) are its
own; all keep the graph's inputs and outputs float32. The result is loaded and run with ONNX
Runtime on CPU and compared with the float32 model (cosine over every output row). Needs
``onnxconverter-common`` (in the ``models`` extra). Prints a markdown table and
writes ``fp16_benchmark.json`` into the output folder.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from tools.bench_common import fmt, markdown_table, run_worker

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "models" / "build"
CONVERTERS = ("graphopt", "onnxconverter-common", "ort-transformers")
LARGE_LAYERS, LARGE_WIDTH = 34, 4096  # 34 × 4096² float32 = 2.28 GB
WORKER_TIMEOUT_S = 900


@dataclass
class Row:
    model: str
    converter: str
    valid: bool
    cosine_min: float | None
    casts: int | None
    seconds: float | None
    peak_mib: float | None
    size_mib: float | None
    error: str = ""


# --- converters, each run in its own process --------------------------------------------------


def _save(proto: onnx.ModelProto, out: Path, external: bool) -> None:
    if external:
        onnx.save(proto, str(out), save_as_external_data=True, location=out.name + ".data")
    else:
        onnx.save(proto, str(out))


def _convert(converter: str, source: Path, out: Path) -> None:
    external = any(
        onnx.external_data_helper.uses_external_data(t)
        for t in onnx.load(str(source), load_external_data=False).graph.initializer
    )
    if converter == "graphopt":
        from graphopt.ir.model import load_model, save_model
        from graphopt.ir.normalize import normalize
        from graphopt.passkit.api import PassContext
        from passes.fp16 import Fp16Pass

        model = load_model(source)
        normalize(model)
        result = Fp16Pass()(model, PassContext())
        save_model(result.model, out)
        return
    proto = onnx.load(str(source))
    if converter == "onnxconverter-common":
        from onnxconverter_common.float16 import convert_float_to_float16

        converted = convert_float_to_float16(proto, keep_io_types=True)
    else:
        from onnxruntime.transformers.float16 import convert_float_to_float16 as ort_convert

        converted = ort_convert(proto, keep_io_types=True)
    _save(converted, out, external)


def _convert_worker(converter: str, source: str, out: str) -> None:
    _convert(converter, Path(source), Path(out))


def _run_worker(converter: str, source: Path, out: Path) -> dict[str, Any]:
    result = run_worker(
        "tools.bench_fp16:_convert_worker",
        {"converter": converter, "source": str(source), "out": str(out)},
        timeout_s=WORKER_TIMEOUT_S,
    )
    if not result.ok:
        return {"error": result.error[:160]}
    return {"seconds": result.seconds, "peak_mib": result.peak_rss_mib}


# --- evaluation -------------------------------------------------------------------------------


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _cosine_min(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
    worst = 1.0
    for want, have in zip(reference, candidate, strict=True):
        a = np.asarray(want, np.float64).reshape(len(want), -1)
        b = np.asarray(have, np.float64).reshape(len(have), -1)
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cosine = (a * b).sum(axis=1) / np.where(norms > 0, norms, 1.0)
        if not np.all(np.isfinite(b)):
            return float("nan")
        worst = min(worst, float(cosine.min()))
    return worst


def _size_mib(path: Path) -> float:
    data = path.with_name(path.name + ".data")
    return (path.stat().st_size + (data.stat().st_size if data.exists() else 0)) / 2**20


def _measure(name: str, source: Path, feeds: list[dict[str, np.ndarray]], work: Path) -> list[Row]:
    reference_session = _session(source)
    reference = [reference_session.run(None, feed) for feed in feeds]
    del reference_session
    rows = []
    for converter in CONVERTERS:
        out = work / (re.sub(r"[^A-Za-z0-9]+", "_", f"{name}_{converter}") + ".onnx")
        info = _run_worker(converter, source, out)
        row = Row(
            name, converter, False, None, None, info.get("seconds"), info.get("peak_mib"), None
        )
        if "error" in info:
            row.error = info["error"]
            rows.append(row)
            continue
        row.size_mib = _size_mib(out)
        row.casts = sum(
            node.op_type == "Cast"
            for graph in _all_graphs(onnx.load(str(out), load_external_data=False).graph)
            for node in graph.node
        )
        try:
            session = _session(out)
            got = [session.run(None, feed) for feed in feeds]
            row.valid = True
            row.cosine_min = min(
                _cosine_min(want, have) for want, have in zip(reference, got, strict=True)
            )
        except Exception as error:  # ORT raises its own exception types
            row.error = str(error).splitlines()[0][:160]
        rows.append(row)
        for path in (out, out.with_name(out.name + ".data")):
            path.unlink(missing_ok=True)
    return rows


def _all_graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    graphs = [graph]
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                graphs.extend(_all_graphs(attribute.g))
    return graphs


# --- models -----------------------------------------------------------------------------------


def _minilm_feeds() -> list[dict[str, np.ndarray]]:
    data = np.load(BUILD / "calib64x128.npz")
    return [{k: v[i : i + 8] for k, v in data.items()} for i in (0, 8)]


def _digits_feeds() -> list[dict[str, np.ndarray]]:
    data = np.load(REPO / "models" / "digits_sample.npz")
    return [{k: v[i : i + 16] for k, v in data.items()} for i in range(0, 64, 16)]


def build_control_flow_model(path: Path) -> list[dict[str, np.ndarray]]:
    """x → MatMul → If (branches read the outer h) → Loop ×3 (body reads outer h) → y."""
    rng = np.random.default_rng(0)

    def init(name: str, shape: tuple[int, ...]) -> TensorProto:
        values = (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
        return numpy_helper.from_array(values, name)

    def info(name: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 64])

    then_g = helper.make_graph(
        [helper.make_node("Add", ["h", "c_then"], ["t"], name="then_add")],
        "then",
        [],
        [info("t")],
        [init("c_then", (64,))],
    )
    else_g = helper.make_graph(
        [helper.make_node("Mul", ["h", "h"], ["e"], name="else_mul")], "else", [], [info("e")]
    )
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["acc", "W_loop"], ["m"], name="loop_mm"),
            helper.make_node("Tanh", ["m"], ["tm"], name="loop_tanh"),
            helper.make_node("Add", ["tm", "h"], ["acc_out"], name="loop_add"),
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="loop_cond"),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            info("acc"),
        ],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), info("acc_out")],
        [init("W_loop", (64, 64))],
    )
    nodes = [
        helper.make_node("MatMul", ["x", "W_in"], ["h"], name="mm_in"),
        helper.make_node("If", ["cond"], ["z"], name="if", then_branch=then_g, else_branch=else_g),
        helper.make_node("Loop", ["trip", "", "z"], ["acc_final"], name="loop", body=body),
        helper.make_node("MatMul", ["acc_final", "W_out"], ["y"], name="mm_out"),
    ]
    graph = helper.make_graph(
        nodes,
        "control_flow",
        [info("x"), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [info("y")],
        [
            init("W_in", (64, 64)),
            init("W_out", (64, 64)),
            numpy_helper.from_array(np.array(3, np.int64), "trip"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    x = rng.standard_normal((8, 64)).astype(np.float32)
    return [{"x": x, "cond": np.array(True)}, {"x": x, "cond": np.array(False)}]


def build_large_model(path: Path) -> list[dict[str, np.ndarray]]:
    """A deep MLP over 2 GB, its weights written to external data one tensor at a time."""
    rng = np.random.default_rng(0)
    data_name = path.name + ".data"
    initializers, nodes = [], []
    offset = 0
    current = "x"
    with open(path.parent / data_name, "wb") as handle:
        for layer in range(LARGE_LAYERS):
            values = rng.standard_normal((LARGE_WIDTH, LARGE_WIDTH), dtype=np.float32)
            values *= np.float32(1.0 / np.sqrt(LARGE_WIDTH))
            raw = values.tobytes()
            handle.write(raw)
            tensor = TensorProto(name=f"W{layer}", data_type=TensorProto.FLOAT)
            tensor.dims.extend(values.shape)
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (
                ("location", data_name),
                ("offset", str(offset)),
                ("length", str(len(raw))),
            ):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            offset += len(raw)
            del values, raw
            initializers.append(tensor)
            output = "y" if layer == LARGE_LAYERS - 1 else f"h{layer}"
            nodes.append(helper.make_node("MatMul", [current, f"W{layer}"], [f"m{layer}"]))
            nodes.append(helper.make_node("Tanh", [f"m{layer}"], [output]))
            current = output
    info = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, LARGE_WIDTH]) for n in "xy"]
    graph = helper.make_graph(nodes, "large_mlp", [info[0]], [info[1]], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return [{"x": rng.standard_normal((1, LARGE_WIDTH)).astype(np.float32)}]


# --- report -----------------------------------------------------------------------------------


def markdown(rows: list[Row]) -> str:
    return markdown_table(
        [
            "model",
            "converter",
            "valid (ORT CPU)",
            "cosine min",
            "Casts",
            "time s",
            "peak MiB",
            "size MiB",
        ],
        [
            [
                row.model,
                row.converter,
                "yes" if row.valid else f"**no**: {row.error}",
                fmt(row.cosine_min, ".6f"),
                fmt(row.casts, "d"),
                fmt(row.seconds, ".2f"),
                fmt(row.peak_mib, ".0f"),
                fmt(row.size_mib, ".1f"),
            ]
            for row in rows
        ],
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=BUILD / "bench_fp16")
    parser.add_argument("--skip-large", action="store_true", help="skip the > 2 GB model")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-fp16-") as folder:
        work = Path(folder)
        cases: list[tuple[str, Path, Any]] = [
            ("MiniLM TorchScript", BUILD / "minilm.onnx", _minilm_feeds),
            ("MiniLM dynamo", BUILD / "minilm_dynamo.onnx", _minilm_feeds),
            ("digits CNN", REPO / "models" / "digits_cnn.onnx", _digits_feeds),
        ]
        for name, source, feeds in cases:
            if source.exists():
                rows.extend(_measure(name, source, feeds(), work))
        control = work / "control_flow.onnx"
        rows.extend(_measure("If/Loop", control, build_control_flow_model(control), work))
        if not args.skip_large:
            large_dir = work / "large"
            large_dir.mkdir()
            large = large_dir / "large_mlp.onnx"
            feeds = build_large_model(large)
            rows.extend(_measure("MLP 2.28 GB (external)", large, feeds, work))
            shutil.rmtree(large_dir)
    table = markdown(rows)
    sys.stdout.write(table + "\n")
    (args.out_dir / "fp16_benchmark.json").write_text(
        json.dumps([asdict(row) for row in rows], indent=2)
    )


if __name__ == "__main__":
    main()
