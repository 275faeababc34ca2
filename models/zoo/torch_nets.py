"""Tiny, seeded versions of the torchvision/timm architecture families, and their ONNX exports.

torchvision cannot be installed beside this torch, so the families are written here, small
(widths 8-64, 32 × 32 inputs) so that one export takes about a second. Rules:

1. Each family keeps the ops that make it awkward for an optimizer: ResNet (basic blocks,
   BatchNorm, strided 1×1 downsample), MobileNetV3 (hardswish, squeeze-excite with
   hardsigmoid, depthwise convs), EfficientNet (MBConv, SiLU, squeeze-excite), ShuffleNetV2
   (channel split and shuffle), SqueezeNet (fire modules, concat, ceil-mode pooling, conv
   classifier), ConvNeXt (depthwise 7×7, channels-last LayerNorm, GELU, layer scale) and a ViT
   (patch conv, class token, position embedding, attention, LayerNorm).
2. Weights are seeded (:func:`models._common.deterministic`); BatchNorm statistics are made
   non-trivial so folding them is not a no-op. Models are exported in eval mode.
3. :func:`export` writes TorchScript exports (``dynamo=False``) at any opset it supports and
   dynamo exports (``dynamo=True``, opset ≥ 18), with a dynamic batch axis, weights inline.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch
from torch import nn

from models._common import deterministic
from models.torch_samples import SelfAttention

Family = Literal[
    "resnet", "mobilenetv3", "efficientnet", "shufflenet", "squeezenet", "convnext", "vit"
]
IMAGE_SIZE = 32
CLASSES = 10
INPUT_NAME = "image"
OUTPUT_NAME = "logits"


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    )


class BasicBlock(nn.Module):
    """ResNet basic block: two 3×3 conv-BN, identity or strided 1×1 shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv_bn(cin, cout, 3, stride), nn.ReLU(), _conv_bn(cout, cout, 3)
        )
        self.shortcut = (
            nn.Identity() if stride == 1 and cin == cout else _conv_bn(cin, cout, 1, stride)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(3, 16, 3), nn.ReLU())
        self.layers = nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 32, 2))
        self.fc = nn.Linear(32, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layers(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, squeeze: int, gate: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeeze, 1)
        self.expand = nn.Conv2d(squeeze, channels, 1)
        self.act, self.gate = act, gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = nn.functional.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.expand(self.act(self.reduce(scale))))


class InvertedResidual(nn.Module):
    """MobileNetV3 / EfficientNet MBConv: expand 1×1, depthwise k×k, SE, project 1×1."""

    def __init__(
        self,
        cin: int,
        hidden: int,
        cout: int,
        kernel: int,
        stride: int,
        act: type[nn.Module],
        gate: type[nn.Module],
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if hidden != cin:
            layers += [_conv_bn(cin, hidden, 1), act()]
        layers += [
            _conv_bn(hidden, hidden, kernel, stride, groups=hidden),
            act(),
            SqueezeExcite(hidden, max(4, hidden // 4), gate(), act()),
            _conv_bn(hidden, cout, 1),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


class TinyMobileNetV3(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn(3, 16, 3, 2),
            nn.Hardswish(),
            InvertedResidual(16, 32, 16, 3, 1, nn.ReLU, nn.Hardsigmoid),
            InvertedResidual(16, 48, 24, 5, 2, nn.Hardswish, nn.Hardsigmoid),
            _conv_bn(24, 48, 1),
            nn.Hardswish(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(48, 32), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(32, CLASSES)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(h, 1))


class TinyEfficientNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn(3, 16, 3, 2),
            nn.SiLU(),
            InvertedResidual(16, 16, 16, 3, 1, nn.SiLU, nn.Sigmoid),
            InvertedResidual(16, 64, 24, 3, 2, nn.SiLU, nn.Sigmoid),
            _conv_bn(24, 64, 1),
            nn.SiLU(),
        )
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    batch, channels, height, width = x.shape
    x = x.view(batch, groups, channels // groups, height, width).transpose(1, 2)
    return x.reshape(batch, channels, height, width)


class ShuffleBlock(nn.Module):
    """ShuffleNetV2 unit: stride 1 splits channels in half, stride 2 has two branches."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        half = cout // 2
        self.stride = stride
        self.branch1 = (
            nn.Sequential(
                _conv_bn(cin, cin, 3, stride, groups=cin), _conv_bn(cin, half, 1), nn.ReLU()
            )
            if stride > 1
            else nn.Identity()
        )
        branch_in = cin if stride > 1 else half
        self.branch2 = nn.Sequential(
            _conv_bn(branch_in, half, 1),
            nn.ReLU(),
            _conv_bn(half, half, 3, stride, groups=half),
            _conv_bn(half, half, 1),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            left, right = x.chunk(2, dim=1)
            out = torch.cat((left, self.branch2(right)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class TinyShuffleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(3, 16, 3, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        self.stage = nn.Sequential(ShuffleBlock(16, 32, 2), ShuffleBlock(32, 32, 1))
        self.conv5 = nn.Sequential(_conv_bn(32, 64, 1), nn.ReLU())
        self.fc = nn.Linear(64, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv5(self.stage(self.stem(x))).mean([2, 3]))


class Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1 = nn.Conv2d(squeeze, expand, 1)
        self.expand3 = nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.squeeze(x))
        return torch.cat((torch.relu(self.expand1(s)), torch.relu(self.expand3(s))), dim=1)


class TinySqueezeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(16, 4, 8),
            Fire(16, 4, 8),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(16, 8, 16),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(0.5), nn.Conv2d(32, CLASSES, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of an NCHW tensor (ConvNeXt's channels-first norm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dwconv(x).permute(0, 2, 3, 1)
        h = self.pwconv2(nn.functional.gelu(self.pwconv1(self.norm(h))))
        return x + (self.gamma * h).permute(0, 3, 1, 2)


class TinyConvNeXt(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 4, 4), LayerNorm2d(16, eps=1e-6))
        self.stage1 = ConvNeXtBlock(16)
        self.down = nn.Sequential(LayerNorm2d(16, eps=1e-6), nn.Conv2d(16, 32, 2, 2))
        self.stage2 = ConvNeXtBlock(32)
        self.norm = nn.LayerNorm(32, eps=1e-6)
        self.head = nn.Linear(32, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(self.norm(h.mean([2, 3])))


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    def __init__(self, dim: int = 32, patch: int = 8, depth: int = 2, heads: int = 2) -> None:
        super().__init__()
        tokens = (IMAGE_SIZE // patch) ** 2
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*(ViTBlock(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        h = self.blocks(torch.cat((cls, tokens), dim=1) + self.pos)
        return self.head(self.norm(h[:, 0]))


FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "resnet": TinyResNet,
    "mobilenetv3": TinyMobileNetV3,
    "efficientnet": TinyEfficientNet,
    "shufflenet": TinyShuffleNet,
    "squeezenet": TinySqueezeNet,
    "convnext": TinyConvNeXt,
    "vit": TinyViT,
}


def build_family(family: str, seed: int = 0) -> nn.Module:
    """A seeded model of ``family`` in eval mode with non-trivial norm statistics (rule 2)."""
    with deterministic(seed, num_threads=None):
        model = FAMILIES[family]()
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.running_mean.normal_(0.0, 0.2)
                    module.running_var.uniform_(0.5, 2.0)
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.normal_(0.0, 0.1)
                elif isinstance(module, nn.LayerNorm):
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.normal_(0.0, 0.1)
    return model.eval()


def export(family: str, path: Path, exporter: Literal["torchscript", "dynamo"], opset: int) -> Path:
    """Export ``family`` to ``path`` with a dynamic batch axis (rule 3)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    model = build_family(family)
    example = torch.from_numpy(family_feeds(batches=1)[0][INPUT_NAME])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
        else:
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                external_data=False,
                verify=False,
                report=False,
                verbose=False,
            )
            if program is None:  # pragma: no cover - dynamo=True always returns a program
                raise RuntimeError("torch.onnx.export(dynamo=True) returned no program")
            program.save(str(path), external_data=False)
    onnx.checker.check_model(str(path), full_check=True)
    return path


def family_feeds(seed: int = 0, batches: int = 4, batch: int = 4) -> list[dict[str, np.ndarray]]:
    """Standard-normal images (ImageNet-normalized range), ``image`` [4, 3, 32, 32]."""
    rng = np.random.default_rng(seed)
    shape = (batch, 3, IMAGE_SIZE, IMAGE_SIZE)
    return [{INPUT_NAME: rng.standard_normal(shape).astype(np.float32)} for _ in range(batches)]
