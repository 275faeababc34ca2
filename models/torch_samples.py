"""A tiny seeded torch model for comparing TorchScript and dynamo ONNX exports.

:class:`TinyNet` has Conv2d+BatchNorm2d+ReLU, LayerNorm, a Linear whose weight is
tied between two uses, GELU and a hand-written 2-head self-attention
(``nn.MultiheadAttention`` is avoided: in eval/no-grad mode it takes the
``_native_multi_head_attention`` fast path, which the TorchScript exporter cannot
export). Input ``x`` float32 [batch, 3, 8, 8]; output ``y`` float32 [batch, 5].

Usage: ``python -m models.torch_samples --out-dir models/build``
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models._common import Exporter, deterministic, export_onnx, run_ort

logger = logging.getLogger(__name__)

IN_CHANNELS = 3
SIZE = 8
HIDDEN = 16
HEADS = 2
OUT_FEATURES = 5
INPUT_NAME = "x"
OUTPUT_NAME = "y"


class SelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention written with matmul + softmax."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError("dim must be divisible by heads")
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        qkv = self.qkv(x).reshape(batch, seq, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, T, head_dim]
        scores = torch.matmul(q, k.transpose(-2, -1)) * (self.head_dim**-0.5)
        ctx = torch.matmul(scores.softmax(dim=-1), v)  # [B, heads, T, head_dim]
        return self.out(ctx.transpose(1, 2).reshape(batch, seq, dim))


class TinyNet(nn.Module):
    """Conv-BN-ReLU stem, then a pre-norm transformer-ish block over the 64 pixels.

    ``fc_in`` and ``fc_out`` share one weight tensor (``fc_out.weight is fc_in.weight``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(IN_CHANNELS, HIDDEN, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm2d(HIDDEN)
        self.norm1 = nn.LayerNorm(HIDDEN)
        self.attn = SelfAttention(HIDDEN, HEADS)
        self.norm2 = nn.LayerNorm(HIDDEN)
        self.fc_in = nn.Linear(HIDDEN, HIDDEN)
        self.fc_out = nn.Linear(HIDDEN, HIDDEN)
        self.fc_out.weight = self.fc_in.weight
        self.head = nn.Linear(HIDDEN, OUT_FEATURES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))  # [B, C, H, W]
        tokens = h.flatten(2).transpose(1, 2)  # [B, H*W, C]
        tokens = tokens + self.attn(self.norm1(tokens))
        mlp = self.fc_out(nn.functional.gelu(self.fc_in(self.norm2(tokens))))
        tokens = tokens + mlp
        return self.head(tokens.mean(dim=1))


def build_tiny(seed: int = 0) -> TinyNet:
    """Seeded :class:`TinyNet` in eval mode, with non-trivial BatchNorm/LayerNorm statistics."""
    with deterministic(seed, num_threads=None):
        model = TinyNet()
        with torch.no_grad():
            model.bn.running_mean.normal_(0.0, 0.5)
            model.bn.running_var.uniform_(0.5, 2.0)
            for norm in (model.bn, model.norm1, model.norm2):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.normal_(0.0, 0.1)
    return model.eval()


def tiny_inputs(batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic model input: ``{"x": float32 [batch, 3, 8, 8]}``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, IN_CHANNELS, SIZE, SIZE), dtype=np.float32)
    return {INPUT_NAME: x}


def tiny_reference(inputs: dict[str, np.ndarray], seed: int = 0) -> np.ndarray:
    """Output of the torch model built with ``seed`` for ``inputs``."""
    with torch.no_grad():
        return build_tiny(seed)(torch.from_numpy(inputs[INPUT_NAME])).numpy()


def export_tiny(
    out_path: Path, exporter: Exporter, *, seed: int = 0, optimize: bool = True
) -> Path:
    """Export :class:`TinyNet` (dynamic batch) with the chosen exporter to ``out_path``.

    With the default ``optimize=True`` both exporters fold the BatchNorm into the Conv;
    ``optimize=False`` keeps a ``BatchNormalization`` node (see
    :func:`models._common.export_onnx`).
    """
    model = build_tiny(seed)
    example = torch.from_numpy(tiny_inputs(batch=2, seed=seed)[INPUT_NAME])
    return export_onnx(
        model,
        (example,),
        Path(out_path),
        exporter=exporter,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        optimize=optimize,
    )


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: export with both exporters and check against torch."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path("models/build"))
    parser.add_argument(
        "--no-optimize",
        action="store_true",
        help="also write tiny_<exporter>_raw.onnx exported with optimize=False",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    for noisy in ("onnx_ir", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    variants = [(e, True) for e in ("torchscript", "dynamo")]
    if args.no_optimize:
        variants += [(e, False) for e in ("torchscript", "dynamo")]
    for exporter, optimize in variants:
        name = f"tiny_{exporter}{'' if optimize else '_raw'}.onnx"
        path = export_tiny(args.out_dir / name, exporter, optimize=optimize)
        diffs = []
        for batch in (1, 2, 5):
            feeds = tiny_inputs(batch, seed=batch)
            (out,) = run_ort(path, feeds)
            diffs.append(float(np.abs(out - tiny_reference(feeds)).max()))
        print(f"{path}  {path.stat().st_size} bytes  max |ORT - torch| {max(diffs):.2e}")


if __name__ == "__main__":
    # Run the copy imported under the package name, so that the dynamo exporter's node
    # metadata names "models.torch_samples.TinyNet" rather than "__main__.TinyNet".
    from models.torch_samples import main as _main

    _main()
