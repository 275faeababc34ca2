"""A decoder-only transformer of random weights, any size, stored as ONNX external data.

    python -m models.large_decoder --out models/build/large/decoder.onnx --gb 4.2 \
        [--width 2048] [--seq 64] [--calib models/build/large/calib.npz]

Used to show that every pass scales past 4 GB (issue 8). Nothing is downloaded and nothing is
committed: the file is generated on demand, one tensor at a time, so generating a 4 GB model
needs memory for one weight matrix, not for the model.

Architecture (pre-LayerNorm, like GPT-2/LLaMA): token embedding (``vocab × width``) → ``layers``
blocks of [LayerNorm → multi-head causal self-attention (Q/K/V/O projections ``width × width``)
→ residual add → LayerNorm → MatMul ``width × 4·width`` + bias → Gelu → MatMul ``4·width × width``
+ bias → residual add] → LayerNorm → LM head ``width × vocab`` → ``logits`` [batch, seq, vocab].
The sequence length is fixed (the causal mask is a constant filled with float32's lowest value,
as Hugging Face models do); the batch is dynamic. Opset 20 (``Gelu``), IR 9.

Weights are seeded and their spectra decay like trained layers' do: each matrix is a rank-
``width/4`` product plus a weaker full-rank part, scaled so activations keep their size through
the residual stream. The number of blocks is the one that brings the file closest to ``--gb``.
Same arguments, byte-identical files.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from onnx import TensorProto, helper, numpy_helper

logger = logging.getLogger(__name__)

OPSET = 20
IR_VERSION = 9
ALIGNMENT = 4096
INLINE_LIMIT_BYTES = 1024
GIB = 1 << 30


@dataclass(frozen=True)
class DecoderShape:
    """The sizes that fix a decoder's graph."""

    layers: int
    width: int = 2048
    heads: int = 16
    vocab: int = 32000
    seq: int = 64

    @property
    def ffn(self) -> int:
        return 4 * self.width

    def block_parameters(self) -> int:
        w, f = self.width, self.ffn
        return 4 * w * w + 2 * w * f + f + w + 4 * w  # projections, FFN + biases, 2 LayerNorms

    def parameters(self) -> int:
        return self.layers * self.block_parameters() + 2 * self.vocab * self.width + 2 * self.width


def shape_for_size(gigabytes: float, width: int = 2048, seq: int = 64) -> DecoderShape:
    """The decoder (at least one block) whose float32 weights come closest to ``gigabytes``."""
    base = DecoderShape(layers=0, width=width, heads=max(1, width // 128), seq=seq)
    fixed = base.parameters() * 4
    per_block = base.block_parameters() * 4
    layers = max(1, round((gigabytes * 1e9 - fixed) / per_block))
    return DecoderShape(layers=layers, width=width, heads=base.heads, seq=seq)


class _ExternalFile:
    """Appends tensors to one external-data file, aligned so ONNX Runtime can map them."""

    def __init__(self, handle: BinaryIO, location: str) -> None:
        self.handle = handle
        self.location = location
        self.offset = 0

    def tensor(self, name: str, values: np.ndarray) -> TensorProto:
        if values.nbytes < INLINE_LIMIT_BYTES:
            return numpy_helper.from_array(values, name)
        padding = (-self.offset) % ALIGNMENT
        self.handle.write(b"\0" * padding)
        self.offset += padding
        self.handle.write(np.ascontiguousarray(values).tobytes())
        proto = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(values.dtype))
        proto.dims.extend(values.shape)
        proto.data_location = TensorProto.EXTERNAL
        for key, value in (
            ("location", self.location),
            ("offset", str(self.offset)),
            ("length", str(values.nbytes)),
        ):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        self.offset += values.nbytes
        return proto


def _spectral_matrix(rng: np.random.Generator, rows: int, cols: int, gain: float) -> np.ndarray:
    """A rows×cols float32 matrix: a rank-min/4 product plus a 30 % full-rank floor.

    Its singular values fall off like a trained layer's, so low-rank and data-aware passes
    behave as on real weights; ``gain`` sets the output's scale relative to the input's.
    """
    rank = max(1, min(rows, cols) // 4)
    left = rng.standard_normal((rows, rank), dtype=np.float32)
    right = rng.standard_normal((rank, cols), dtype=np.float32)
    product = left @ right
    product *= np.float32(1.0 / np.sqrt(rank * rows))
    noise = rng.standard_normal((rows, cols), dtype=np.float32)
    noise *= np.float32(0.3 / np.sqrt(rows))
    product += noise
    product *= np.float32(gain)
    return product


def _nodes_for_block(index: int, shape: DecoderShape, hidden: str) -> tuple[list, str]:
    """The nodes of one block reading ``hidden``; returns them and the block's output name."""
    p = f"blocks.{index}."
    make = helper.make_node
    nodes = [
        make(
            "LayerNormalization",
            [hidden, p + "ln1.w", p + "ln1.b"],
            [p + "ln1"],
            axis=-1,
            name=p + "ln1",
        ),
    ]
    for proj in "qkv":
        nodes += [
            make("MatMul", [p + "ln1", p + f"attn.{proj}.w"], [p + proj], name=p + f"attn.{proj}"),
            make("Reshape", [p + proj, "heads_shape"], [p + proj + ".heads"], name=p + proj + ".r"),
        ]
    nodes += [
        make("Transpose", [p + "q.heads"], [p + "q.t"], perm=[0, 2, 1, 3], name=p + "q.t"),
        make("Transpose", [p + "k.heads"], [p + "k.t"], perm=[0, 2, 3, 1], name=p + "k.t"),
        make("Transpose", [p + "v.heads"], [p + "v.t"], perm=[0, 2, 1, 3], name=p + "v.t"),
        make("MatMul", [p + "q.t", p + "k.t"], [p + "scores"], name=p + "scores"),
        make("Mul", [p + "scores", "attn_scale"], [p + "scaled"], name=p + "scale"),
        make("Add", [p + "scaled", "causal_mask"], [p + "masked"], name=p + "mask"),
        make("Softmax", [p + "masked"], [p + "probs"], axis=-1, name=p + "softmax"),
        make("MatMul", [p + "probs", p + "v.t"], [p + "context"], name=p + "context"),
        make(
            "Transpose", [p + "context"], [p + "context.t"], perm=[0, 2, 1, 3], name=p + "context.t"
        ),
        make("Reshape", [p + "context.t", "model_shape"], [p + "merged"], name=p + "merge"),
        make("MatMul", [p + "merged", p + "attn.o.w"], [p + "attn"], name=p + "attn.o"),
        make("Add", [hidden, p + "attn"], [p + "res1"], name=p + "res1"),
        make(
            "LayerNormalization",
            [p + "res1", p + "ln2.w", p + "ln2.b"],
            [p + "ln2"],
            axis=-1,
            name=p + "ln2",
        ),
        make("MatMul", [p + "ln2", p + "ffn.up.w"], [p + "up"], name=p + "ffn.up"),
        make("Add", [p + "up", p + "ffn.up.b"], [p + "up.b"], name=p + "ffn.up.bias"),
        make("Gelu", [p + "up.b"], [p + "gelu"], name=p + "gelu"),
        make("MatMul", [p + "gelu", p + "ffn.down.w"], [p + "down"], name=p + "ffn.down"),
        make("Add", [p + "down", p + "ffn.down.b"], [p + "down.b"], name=p + "ffn.down.bias"),
        make("Add", [p + "res1", p + "down.b"], [p + "out"], name=p + "res2"),
    ]
    return nodes, p + "out"


def _block_weights(
    rng: np.random.Generator, index: int, shape: DecoderShape
) -> Iterator[tuple[str, np.ndarray]]:
    p = f"blocks.{index}."
    w, f = shape.width, shape.ffn
    depth_gain = 1.0 / np.sqrt(2.0 * max(shape.layers, 1))  # keeps the residual stream's scale
    yield p + "ln1.w", np.ones(w, np.float32)
    yield p + "ln1.b", np.zeros(w, np.float32)
    for proj in "qkv":
        yield p + f"attn.{proj}.w", _spectral_matrix(rng, w, w, 1.0)
    yield p + "attn.o.w", _spectral_matrix(rng, w, w, depth_gain)
    yield p + "ln2.w", np.ones(w, np.float32)
    yield p + "ln2.b", np.zeros(w, np.float32)
    yield p + "ffn.up.w", _spectral_matrix(rng, w, f, 1.0)
    yield p + "ffn.up.b", (0.02 * rng.standard_normal(f)).astype(np.float32)
    yield p + "ffn.down.w", _spectral_matrix(rng, f, w, depth_gain)
    yield p + "ffn.down.b", (0.02 * rng.standard_normal(w)).astype(np.float32)


def build_decoder(path: Path, shape: DecoderShape, seed: int = 0) -> Path:
    """Write the decoder to ``path`` (+ ``path.name + '.data'``), one tensor at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, seq = shape.width, shape.seq
    data_name = path.name + ".data"
    initializers: list[TensorProto] = []
    nodes = [
        helper.make_node("Gather", ["embed.w", "input_ids"], ["hidden.0"], axis=0, name="embed"),
    ]
    mask = np.triu(np.full((seq, seq), np.finfo(np.float32).min, np.float32), k=1)
    with open(path.parent / data_name, "wb") as handle:
        store = _ExternalFile(handle, data_name)
        embed = (0.02 * rng.standard_normal((shape.vocab, w), dtype=np.float32)).astype(np.float32)
        initializers.append(store.tensor("embed.w", embed))
        del embed
        initializers += [
            store.tensor("causal_mask", mask),
            numpy_helper.from_array(
                np.array([0, seq, shape.heads, w // shape.heads], np.int64), "heads_shape"
            ),
            numpy_helper.from_array(np.array([0, seq, w], np.int64), "model_shape"),
            numpy_helper.from_array(
                np.array(1.0 / np.sqrt(w // shape.heads), np.float32), "attn_scale"
            ),
        ]
        hidden = "hidden.0"
        for index in range(shape.layers):
            block_nodes, hidden = _nodes_for_block(index, shape, hidden)
            nodes += block_nodes
            for name, values in _block_weights(rng, index, shape):
                initializers.append(store.tensor(name, values))
                del values
            logger.info("block %d of %d written", index + 1, shape.layers)
        initializers += [
            store.tensor("ln_f.w", np.ones(w, np.float32)),
            store.tensor("ln_f.b", np.zeros(w, np.float32)),
            store.tensor("lm_head.w", _spectral_matrix(rng, w, shape.vocab, 1.0)),
        ]
    nodes += [
        helper.make_node(
            "LayerNormalization", [hidden, "ln_f.w", "ln_f.b"], ["final"], axis=-1, name="ln_f"
        ),
        helper.make_node("MatMul", ["final", "lm_head.w"], ["logits"], name="lm_head"),
    ]
    graph = helper.make_graph(
        nodes,
        "large_decoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", seq])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", seq, shape.vocab])],
        initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="graphopt-models"
    )
    model.ir_version = IR_VERSION
    temp = path.with_name(path.name + ".tmp")
    temp.write_bytes(model.SerializeToString(deterministic=True))
    temp.replace(path)
    return path


def token_batches(shape: DecoderShape, samples: int, seed: int = 1) -> dict[str, np.ndarray]:
    """``samples`` sequences of random token ids below the vocabulary size (an .npz's content)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, shape.vocab, size=(samples, shape.seq), dtype=np.int64)
    return {"input_ids": ids}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--gb", type=float, default=4.2, help="target size in GB (1e9 bytes)")
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib", type=Path, help="also write N random-token sequences here")
    parser.add_argument("--samples", type=int, default=8)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    shape = shape_for_size(args.gb, args.width, args.seq)
    build_decoder(args.out, shape, args.seed)
    size = args.out.stat().st_size + (args.out.parent / (args.out.name + ".data")).stat().st_size
    print(
        f"{args.out}: {shape.layers} blocks, width {shape.width}, "
        f"{shape.parameters() / 1e9:.2f} B parameters, {size / 1e9:.2f} GB on disk"
    )
    if args.calib:
        np.savez(args.calib, **token_batches(shape, args.samples, args.seed + 1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
