"""Train a small CNN on scikit-learn's 8x8 digits and export it with the TorchScript exporter.

Produces ``digits_cnn.onnx`` (input ``image`` float32 [batch, 1, 8, 8], output
``logits`` float32 [batch, 10]), ``digits_sample.npz`` (key ``image``: the first 64
test images) and ``digits_sample_labels.npy`` (their int64 labels).

Usage: ``python -m models.digits_cnn --out-dir models``
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models._common import deterministic, export_onnx, run_ort

logger = logging.getLogger(__name__)

N_TEST = 297
N_SAMPLE = 64
EPOCHS = 20
BATCH_SIZE = 32
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-2


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU x2, flatten, Linear-ReLU-Linear; input [batch, 1, 8, 8]."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(image))


def load_digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(x_train, y_train, x_test, y_test)``; the last 297 samples are the test set.

    Images are float32 [n, 1, 8, 8] scaled to [0, 1]; labels are int64.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = data.target.astype(np.int64)
    return x[:-N_TEST], y[:-N_TEST], x[-N_TEST:], y[-N_TEST:]


def train_digits_cnn(seed: int = 0) -> tuple[nn.Module, float]:
    """Train :class:`DigitsCNN` deterministically; return the eval-mode model and test accuracy."""
    x_train, y_train, x_test, y_test = load_digits_split()
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    with deterministic(seed, num_threads=1):
        model = DigitsCNN()
        opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS)
        gen = torch.Generator().manual_seed(seed)
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        for epoch in range(EPOCHS):
            perm = torch.randperm(len(xt), generator=gen)
            total = 0.0
            for i in range(0, len(perm), BATCH_SIZE):
                idx = perm[i : i + BATCH_SIZE]
                opt.zero_grad()
                loss = loss_fn(model(xt[idx]), yt[idx])
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            sched.step()
            logger.debug("epoch %d loss %.4f", epoch, total / len(perm))
        model.eval()
        with torch.no_grad():
            pred = model(torch.from_numpy(x_test)).argmax(dim=1).numpy()
    accuracy = float((pred == y_test).mean())
    logger.info("digits CNN test accuracy %.4f (%d samples)", accuracy, len(y_test))
    return model, accuracy


def export_digits_cnn(out_dir: Path, seed: int = 0) -> Path:
    """Train, export ``digits_cnn.onnx`` and write the sample inputs/labels into ``out_dir``.

    Returns the path of the ``.onnx`` file.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, accuracy = train_digits_cnn(seed)
    _, _, x_test, y_test = load_digits_split()
    sample = np.ascontiguousarray(x_test[:N_SAMPLE], dtype=np.float32)
    labels = np.ascontiguousarray(y_test[:N_SAMPLE], dtype=np.int64)

    onnx_path = export_onnx(
        model,
        (torch.from_numpy(sample[:2]),),
        out_dir / "digits_cnn.onnx",
        exporter="torchscript",
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
    )
    np.savez(out_dir / "digits_sample.npz", image=sample)
    np.save(out_dir / "digits_sample_labels.npy", labels)

    (ort_logits,) = run_ort(onnx_path, {"image": sample})
    with torch.no_grad():
        ref = model(torch.from_numpy(sample)).numpy()
    max_diff = float(np.abs(ort_logits - ref).max())
    if max_diff > 1e-4:
        raise RuntimeError(f"onnxruntime and torch disagree on digits CNN: {max_diff}")
    sample_acc = float((ort_logits.argmax(1) == labels).mean())
    logger.info(
        "test acc %.4f, sample acc (ORT) %.4f, max |ORT - torch| %.2e",
        accuracy,
        sample_acc,
        max_diff,
    )
    return onnx_path


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO)
    path = export_digits_cnn(args.out_dir, seed=args.seed)
    for f in (path, args.out_dir / "digits_sample.npz", args.out_dir / "digits_sample_labels.npy"):
        print(f"{f}  {f.stat().st_size} bytes")


if __name__ == "__main__":
    main()
