"""A zoo of awkward ONNX models: every form exporters write that an optimizer must survive.

Each :class:`ZooEntry` has a name, a builder that writes ``<name>.onnx`` into a folder and
returns its path, seeded feeds valid for the model, and what it exercises. Rules:

1. Every model has random, seeded weights; building twice gives the same graph and weights.
2. ``onnx.helper`` models (:mod:`models.zoo.onnx_nets`) need no torch and build in
   milliseconds; torch models (:mod:`models.zoo.torch_nets`) are marked ``torch=True`` and are
   only imported when built. Torch exports are ``slow`` (seconds each) except one TorchScript
   and one dynamo export (:data:`QUICK_TORCH_ENTRIES`), which a quick test tier can afford.
3. ``synthesize=True`` asks a consumer to give graphopt no data, so that graphopt's own input
   synthesis is what runs the model; ``make_feeds`` is still valid for checks of its own.
4. ``as_npz=True`` asks a consumer to hand the feeds over as one ``.npz`` file (one array per
   input, axis 0 = samples), the format the CLI reads with ``--calib-data``.
5. ``may_refuse`` maps a pass (or comma-joined pass list) to why graphopt may honestly refuse
   the model with an input error. No entry declares one today: every model here can be
   processed.

Usage: ``python -m models.zoo --out-dir models/build/zoo [--torch]`` writes every model.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper

from models.zoo import onnx_nets
from models.zoo._graph import all_tensors

logger = logging.getLogger(__name__)

Feeds = list[dict[str, np.ndarray]]

#: Opsets of the helper-built classifier family: Paddle2ONNX writes 9-12, old torch 11,
#: torch's TorchScript exporter 17, recent onnx releases up to 21.
CLASSIFIER_OPSETS = (9, 11, 12, 13, 17, 20, 21)
#: TorchScript export opsets of the torch families; dynamo exports use 18.
TORCHSCRIPT_OPSETS = (11, 13, 17)
DYNAMO_OPSET = 18
#: Families also exported with dynamo.
DYNAMO_FAMILIES = ("resnet", "convnext", "vit")
#: The torch exports a quick tier runs: one TorchScript CNN, one dynamo transformer.
QUICK_TORCH_ENTRIES = frozenset({"resnet_ts_op13", "vit_dynamo_op18"})
TORCH_FAMILIES = (
    "resnet",
    "mobilenetv3",
    "efficientnet",
    "shufflenet",
    "squeezenet",
    "convnext",
    "vit",
)


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model; see the module rules."""

    name: str
    build: Callable[[Path, str], Path]
    make_feeds: Callable[[], Feeds]
    exercises: str
    torch: bool = False
    slow: bool = False
    synthesize: bool = False
    as_npz: bool = False
    may_refuse: Mapping[str, str] = field(default_factory=dict)

    def build_in(self, folder: Path) -> Path:
        """Write the model into ``folder`` and return the path of its ``.onnx`` file."""
        folder.mkdir(parents=True, exist_ok=True)
        return self.build(folder, self.name)


def _torch_builder(family: str, exporter: str, opset: int) -> Callable[[Path, str], Path]:
    def build(folder: Path, name: str) -> Path:
        from models.zoo.torch_nets import export

        return export(family, folder / f"{name}.onnx", exporter, opset)  # type: ignore[arg-type]

    return build


def _torch_feeds() -> Feeds:
    from models.zoo.torch_nets import family_feeds

    return family_feeds()


_DUPLICATE_NAMES = (
    "the input repeats a node name within one graph, which ONNX forbids and ONNX Runtime "
    "refuses to load, so the original cannot be run for validation"
)
_ALL_SPECS = ("cleanup", "quant", "lowrank", "sparsify", "fp16", "cleanup,quant")


def _onnx_entries() -> list[ZooEntry]:
    n = onnx_nets
    entries = [
        ZooEntry(
            f"classifier_op{opset}",
            n.classifier_builder(opset),
            n.classifier_feeds,
            f"opset {opset}: Conv/BN/Clip/Pad/Split/Resize/Reduce/Squeeze/MatMul/Gemm in the "
            "forms this opset defines",
        )
        for opset in CLASSIFIER_OPSETS
    ]
    entries += [
        ZooEntry(
            "constant_nodes_op12",
            n.classifier_builder(12, weight_style="constant"),
            n.classifier_feeds,
            "Paddle/tf2onnx style: every weight and axes tensor is a Constant node",
        ),
        ZooEntry(
            "constant_if_op16",
            n.build_constant_if,
            n.vad_feeds,
            "VAD style: Conv/MatMul weights as Constant nodes inside If branches on `sr`",
        ),
        ZooEntry(
            "graph_inputs_ir3_op9",
            n.build_graph_inputs_ir3,
            n.ir3_feeds,
            "Caffe2 era: IR 3, initializers listed as graph inputs, ConstantOfShape bias",
        ),
        ZooEntry(
            "unnamed_nodes_op13",
            n.classifier_builder(13, naming="empty"),
            n.classifier_feeds,
            "no node has a name",
        ),
        ZooEntry(
            "duplicate_names_op13",
            n.classifier_builder(13, naming="duplicate"),
            n.classifier_feeds,
            "node names repeat inside the main graph (invalid ONNX; ONNX Runtime refuses it)",
            may_refuse={spec: _DUPLICATE_NAMES for spec in _ALL_SPECS},
        ),
        ZooEntry(
            "reused_names_op13",
            n.if_bodies_builder(naming="per_graph"),
            n.if_feeds,
            "If branches reuse the node names of the main graph and of each other (valid)",
        ),
        ZooEntry(
            "if_bodies_op13",
            n.build_if_bodies,
            n.if_feeds,
            "If on a data-dependent condition; Conv and MatMul on branch initializers",
        ),
        ZooEntry(
            "loop_body_op13",
            n.build_loop_body,
            n.loop_feeds,
            "Loop (3 steps) whose body runs Conv and MatMul on Constant-node weights",
        ),
        ZooEntry(
            "scan_body_op11",
            n.build_scan_body,
            partial(n.sequence_feeds, 16),
            "Scan RNN whose body runs Conv1d and MatMuls on outer-scope weights",
        ),
        ZooEntry("lstm_op14", n.build_lstm, partial(n.sequence_feeds, 8), "LSTM + MatMul head"),
        ZooEntry(
            "gru_op11",
            n.build_gru,
            partial(n.sequence_feeds, 8),
            "bidirectional GRU (linear_before_reset) + MatMul head",
        ),
        ZooEntry(
            "dynamic_stride32_op12",
            n.build_dynamic_stride32,
            n.stride32_feeds,
            "dynamic H, W on a stride-32 FPN; graphopt must synthesize inputs that run",
            synthesize=True,
        ),
        ZooEntry(
            "static_batch8_op13",
            n.build_static_batch8,
            n.static_batch_feeds,
            "batch fixed at 8, data given as an .npz of samples",
            as_npz=True,
        ),
        ZooEntry(
            "external_data_op17",
            n.classifier_builder(17, external_data=True),
            n.classifier_feeds,
            "every float tensor in one external data file (shape operands stay inline)",
        ),
        ZooEntry(
            "yolo_head_op17",
            n.build_yolo_head,
            n.yolo_feeds,
            "YOLOv8 head: [1, 4 + 20, 84] packing pixel boxes and sigmoid class scores, DFL conv",
        ),
    ]
    return entries


def _torch_entries() -> list[ZooEntry]:
    entries = [
        ZooEntry(
            f"{family}_ts_op{opset}",
            _torch_builder(family, "torchscript", opset),
            _torch_feeds,
            f"tiny {family}, TorchScript export at opset {opset}",
            torch=True,
            slow=f"{family}_ts_op{opset}" not in QUICK_TORCH_ENTRIES,
        )
        for family in TORCH_FAMILIES
        for opset in TORCHSCRIPT_OPSETS
    ]
    entries += [
        ZooEntry(
            f"{family}_dynamo_op{DYNAMO_OPSET}",
            _torch_builder(family, "dynamo", DYNAMO_OPSET),
            _torch_feeds,
            f"tiny {family}, dynamo export at opset {DYNAMO_OPSET}",
            torch=True,
            slow=f"{family}_dynamo_op{DYNAMO_OPSET}" not in QUICK_TORCH_ENTRIES,
        )
        for family in DYNAMO_FAMILIES
    ]
    return entries


def zoo_entries() -> list[ZooEntry]:
    """Every zoo entry: the helper-built models first, then the torch exports."""
    return _onnx_entries() + _torch_entries()


def model_files(path: Path) -> list[Path]:
    """The ``.onnx`` file and every external data file it references, in a stable order."""
    proto = onnx.load(str(path), load_external_data=False)
    locations = sorted(
        {
            external_data_helper.ExternalDataInfo(tensor).location
            for tensor in all_tensors(proto.graph)
            if external_data_helper.uses_external_data(tensor)
        }
    )
    return [path, *(path.parent / location for location in locations)]


def copy_model(path: Path, folder: Path) -> Path:
    """Copy a model and its external data files into ``folder``; returns the new ``.onnx``."""
    folder.mkdir(parents=True, exist_ok=True)
    for file in model_files(path):
        shutil.copy2(file, folder / file.name)
    return folder / path.name


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: write the zoo's models into a folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path("models/build/zoo"))
    parser.add_argument("--torch", action="store_true", help="also export the torch families")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for entry in zoo_entries():
        if entry.torch and not args.torch:
            continue
        path = entry.build_in(args.out_dir)
        size = sum(file.stat().st_size for file in model_files(path))
        logger.info("%-28s %8d bytes  %s", entry.name, size, entry.exercises)


if __name__ == "__main__":
    main()
