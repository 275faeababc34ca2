"""Shared helpers for the sample-model export scripts: determinism, export, inspection."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch

logger = logging.getLogger(__name__)

Exporter = Literal["torchscript", "dynamo"]

#: Opset used with the TorchScript exporter (``dynamo=False``).
TORCHSCRIPT_OPSET = 17
#: Opset used with the dynamo exporter; 18 is the native opset of torchlib, so no
#: version conversion runs after translation.
DYNAMO_OPSET = 18
#: Node metadata written by the dynamo exporter that holds absolute source paths and
#: line numbers; it is dropped so that the bytes do not depend on the checkout location.
_PATH_DEPENDENT_METADATA = ("pkg.torch.onnx.stack_trace",)


@contextlib.contextmanager
def deterministic(seed: int, num_threads: int | None = 1) -> Iterator[None]:
    """Seed torch, enable deterministic algorithms and pin the thread count.

    The global RNG state, the deterministic-algorithms flag and the intra-op thread
    count are restored on exit, so callers do not observe any change.
    """
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
            torch.set_num_threads(prev_threads)


def export_onnx(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    out_path: Path,
    *,
    exporter: Exporter,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]],
    optimize: bool = True,
) -> Path:
    """Export ``module`` to a single self-contained ``.onnx`` file.

    ``dynamic_axes`` maps input names to ``{axis: dim_name}``; for the dynamo
    exporter it is translated into ``dynamic_shapes`` (one ``torch.export.Dim`` per
    distinct dim name, keyed by the ``forward`` argument order). Output axes follow
    from the inputs under dynamo; under TorchScript they are declared with the
    same names so that the output shapes are symbolic too. Output axes not listed
    in ``dynamic_axes`` are pinned to the sizes torch produces for ``args``.

    Both exporters fold eval-mode BatchNorm into the preceding Conv by default.
    ``optimize=False`` asks for a rawer graph that keeps ``BatchNormalization``:
    dynamo skips its onnxscript optimizer (``optimize=False``; Constant/Identity
    nodes remain), TorchScript uses the deprecated ``training=PRESERVE`` with
    ``do_constant_folding=False`` (the module is in eval mode, so semantics are
    unchanged).
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    with torch.no_grad():
        outputs = module(*args)
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        out_shapes = [tuple(t.shape) for t in outputs]
        if exporter == "torchscript":
            _export_torchscript(
                module, args, out_path, input_names, output_names, dynamic_axes, optimize
            )
        elif exporter == "dynamo":
            dims: dict[str, torch.export.Dim] = {}
            shapes: list[dict[int, torch.export.Dim] | None] = []
            for name in input_names:
                axes = dynamic_axes.get(name)
                if not axes:
                    shapes.append(None)
                    continue
                shapes.append(
                    {ax: dims.setdefault(dn, torch.export.Dim(dn)) for ax, dn in axes.items()}
                )
            with warnings.catch_warnings():
                # Sharing one Dim between inputs makes the renamer warn once per reuse.
                warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used")
                program = _export_dynamo(
                    module, args, input_names, output_names, tuple(shapes), optimize
                )
            program.save(str(out_path), external_data=False)
        else:  # pragma: no cover - guarded by the Literal type
            raise ValueError(f"unknown exporter {exporter!r}")
    _normalise_saved_model(out_path, output_names, out_shapes, dynamic_axes)
    onnx.checker.check_model(str(out_path), full_check=True)
    logger.info("exported %s (%s, %d bytes)", out_path, exporter, out_path.stat().st_size)
    return out_path


def _export_torchscript(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    out_path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]],
    optimize: bool,
) -> None:
    """Call ``torch.onnx.export(dynamo=False)`` at :data:`TORCHSCRIPT_OPSET`."""
    extra: dict[str, object] = {}
    if not optimize:
        # EVAL mode runs the eval peephole pass that folds BatchNorm into Conv.
        extra["training"] = torch.onnx.TrainingMode.PRESERVE
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*constant folding be turned off")
        torch.onnx.export(
            module,
            args,
            str(out_path),
            dynamo=False,
            input_names=list(input_names),
            output_names=list(output_names),
            opset_version=TORCHSCRIPT_OPSET,
            dynamic_axes={k: dict(v) for k, v in dynamic_axes.items()},
            do_constant_folding=optimize,
            **extra,  # type: ignore[arg-type]
        )


def _export_dynamo(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_shapes: tuple[dict[int, torch.export.Dim] | None, ...],
    optimize: bool,
) -> torch.onnx.ONNXProgram:
    """Call ``torch.onnx.export(dynamo=True)``; weights stay inline (``external_data=False``)."""
    program = torch.onnx.export(
        module,
        args,
        dynamo=True,
        input_names=list(input_names),
        output_names=list(output_names),
        opset_version=DYNAMO_OPSET,
        dynamic_shapes=dynamic_shapes,
        external_data=False,
        optimize=optimize,
        verify=False,
        report=False,
        verbose=False,
    )
    if program is None:  # pragma: no cover - dynamo=True always returns a program
        raise RuntimeError("torch.onnx.export(dynamo=True) returned no program")
    return program


def _normalise_saved_model(
    path: Path,
    output_names: Sequence[str],
    out_shapes: Sequence[tuple[int, ...]],
    dynamic_axes: Mapping[str, Mapping[int, str]],
) -> None:
    """Pin static output dims and drop path-dependent node metadata, rewriting ``path``.

    The TorchScript exporter sometimes leaves a static output axis symbolic (e.g.
    ``Divsentence_embedding_dim_1``); the dynamo exporter records absolute source
    paths in ``pkg.torch.onnx.stack_trace``.
    """
    model = onnx.load(str(path))
    for value, name, shape in zip(model.graph.output, output_names, out_shapes, strict=True):
        if value.name != name:
            raise RuntimeError(f"exported output {value.name!r} is not named {name!r}")
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(shape):
            continue
        axes = dynamic_axes.get(name, {})
        for axis, (dim, size) in enumerate(zip(dims, shape, strict=True)):
            if axis in axes:
                dim.dim_param = axes[axis]
            else:
                dim.dim_value = size
    nodes: list[onnx.NodeProto] = list(model.graph.node)
    for function in model.functions:
        nodes.extend(function.node)
    for node in nodes:
        kept = [p for p in node.metadata_props if p.key not in _PATH_DEPENDENT_METADATA]
        if len(kept) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(kept)
    onnx.save(model, str(path))


def op_histogram(path: Path) -> Counter[str]:
    """Count the nodes of the main graph of an ONNX file by ``domain::op_type``."""
    model = onnx.load(str(path), load_external_data=False)
    return Counter(
        (f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type)
        for n in model.graph.node
    )


def run_ort(path: Path, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run an ONNX file once on the onnxruntime CPU provider."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in sess.run(None, dict(feeds))]


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
