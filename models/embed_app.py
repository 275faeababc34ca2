"""A sentence-embedding application, as serving code is written: the program to capture feeds from.

It reads sentences (one per line, or the documentation sentences ``models.export_minilm``
calibrates on), tokenizes them in batches padded to the batch's longest sentence (dynamic
padding, the tokenizer's ``padding=True``), runs the MiniLM ONNX model with ONNX Runtime and
writes the L2-normalised embeddings. Nothing in it knows about graphopt::

    graphopt capture --out models/build/captured -- \\
        python -m models.embed_app --model models/build/minilm.onnx --docs 64

records the feeds it passes to ONNX Runtime (``models/build/captured/minilm/``).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from models.export_minilm import (
    EVALUATION_RESERVED,
    MAX_TOKENS,
    evaluation_sentences,
    tokenize,
)


def batches(texts: Sequence[str], batch: int) -> Iterator[dict[str, np.ndarray]]:
    """Feeds of ``batch`` sentences each, padded to the longest in the batch (≤ 128 tokens)."""
    for start in range(0, len(texts), batch):
        yield tokenize(list(texts[start : start + batch]), MAX_TOKENS, to_longest=True)


def documentation_sentences(count: int) -> list[str]:
    """``count`` documentation sentences after the evaluation set (as calibration uses)."""
    return evaluation_sentences(EVALUATION_RESERVED + count)[EVALUATION_RESERVED:]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--sentences", type=Path, help="a text file, one sentence per line")
    source.add_argument("--docs", type=int, help="this many documentation sentences")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", type=Path, help="write the embeddings here (.npy)")
    args = parser.parse_args(argv)
    if args.sentences is not None:
        texts = [line.strip() for line in args.sentences.read_text().splitlines() if line.strip()]
    else:
        texts = documentation_sentences(args.docs)
    session = ort.InferenceSession(str(args.model), providers=["CPUExecutionProvider"])
    embeddings = [session.run(None, feed)[0] for feed in batches(texts, args.batch)]
    result = np.concatenate(embeddings) if embeddings else np.zeros((0, 0), np.float32)
    if args.out is not None:
        np.save(args.out, result)
    print(f"embedded {len(texts)} sentences: {result.shape}")


if __name__ == "__main__":
    main()
