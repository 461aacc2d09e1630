"""Word-shingle MinHash signatures for many documents at once (Polars + NumPy, no Python loop per doc).

Why not datasketch's `MinHash` per document: it hashes every shingle in Python and then applies
128 permutations to each, which is the cost that dominates a million-pair dedup. Here

- words are hashed by Polars (native, multi-threaded), shingle hashes are rolled from word hashes
  with a few vectorised NumPy operations over a whole chunk of documents;
- the signature is a *one-permutation* MinHash (Li, Owen & Zhang 2012): the top bits of a
  shingle's hash choose one of `bins` bins and the minimum per bin is kept, so each shingle is
  hashed once instead of once per permutation. Two documents agree on a bin with probability
  equal to their Jaccard similarity, like classic MinHash. Bins left empty by short documents are
  filled by rotation densification (Shrivastava & Li 2014), which keeps that property.
- band keys (LSH) are `bands` hashes of `rows` consecutive bins; documents sharing any band key
  are candidates, to be verified with the exact Jaccard similarity of their shingle sets.

`benchmarks/dedup_scale.py` measures this against a straightforward datasketch MinHashLSH loop.
Hashes come from Polars' seeded hash: stable within one environment, not promised across Polars
versions, so signatures are recomputed on each run and never stored as long-lived data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

U64 = np.uint64
_MASK_BITS = 57  # 64 - 7: the low bits of a shingle hash are its value inside its bin
_EMPTY = np.iinfo(np.uint64).max


@dataclass(frozen=True)
class ShingleConfig:
    """MinHash parameters; the values come from the curation config (`CurationConfig.shingles()`)."""

    words: int  # words per shingle (short texts use their whole text as one shingle)
    bins: int  # signature length (one-permutation MinHash bins); a power of two
    bands: int  # LSH bands; bins = bands x rows
    seed: int = 1  # part of the algorithm, not a setting: changing it changes every signature

    def __post_init__(self):
        if self.bins & (self.bins - 1) or not 8 <= self.bins <= 1024:
            raise ValueError(f"bins must be a power of two between 8 and 1024, got {self.bins}")
        if self.bins % self.bands:
            raise ValueError(f"bins ({self.bins}) must be a multiple of bands ({self.bands})")
        if self.words < 1:
            raise ValueError("words must be >= 1")

    @property
    def rows(self) -> int:
        return self.bins // self.bands


def normalize(texts: pl.Series) -> pl.Series:
    """Lowercase, every run of non-letters/digits to one space, trimmed: the text dedup compares."""
    return texts.str.to_lowercase().str.replace_all(r"[^\p{L}\p{N}]+", " ").str.strip_chars()


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads the bits of a rolled shingle hash evenly (wrapping uint64)."""
    x = x ^ (x >> U64(30))
    x = x * U64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> U64(27))
    x = x * U64(0x94D049BB133111EB)
    return x ^ (x >> U64(31))


def shingle_hashes(normalized: pl.Series, cfg: ShingleConfig) -> tuple[np.ndarray, np.ndarray]:
    """(doc index, shingle hash) for every w-word shingle of every document, as two flat arrays.

    A document with fewer than `cfg.words` words is one shingle (the hash of its whole text);
    an empty document has none.
    """
    words = pl.DataFrame({"doc": np.arange(len(normalized), dtype=np.int64), "w": normalized.str.split(" ")})
    words = words.explode("w", empty_as_null=True).filter(pl.col("w").is_not_null() & (pl.col("w") != ""))
    doc = words["doc"].to_numpy()
    hw = words["w"].hash(seed=cfg.seed).to_numpy().astype(U64, copy=False)
    w = cfg.words
    n_words = np.bincount(doc, minlength=len(normalized))

    parts_doc, parts_hash = [], []
    if len(hw) >= w:
        rolled = np.zeros(len(hw) - w + 1, dtype=U64)
        for j in range(w):  # polynomial rolling hash over w consecutive word hashes (wraps mod 2^64)
            rolled = rolled * U64(0x100000001B3) + hw[j : len(hw) - w + 1 + j]
        same_doc = doc[: len(hw) - w + 1] == doc[w - 1 :]
        parts_doc.append(doc[: len(hw) - w + 1][same_doc])
        parts_hash.append(_mix(rolled[same_doc]))
    short = np.flatnonzero((n_words > 0) & (n_words < w))
    if len(short):
        whole = normalized.gather(short).hash(seed=cfg.seed + 1).to_numpy().astype(U64, copy=False)
        parts_doc.append(short.astype(np.int64))
        parts_hash.append(_mix(whole))
    if not parts_doc:
        return np.zeros(0, np.int64), np.zeros(0, U64)
    return np.concatenate(parts_doc), np.concatenate(parts_hash)


def signatures(doc: np.ndarray, hashes: np.ndarray, n_docs: int, cfg: ShingleConfig) -> np.ndarray:
    """(n_docs, bins) one-permutation MinHash signatures; rows of empty documents stay all-max."""
    shift = U64(64 - int(np.log2(cfg.bins)))
    bin_of = (hashes >> shift).astype(np.int64)
    value = hashes & U64((1 << int(shift)) - 1)
    sig = np.full(n_docs * cfg.bins, _EMPTY, dtype=U64)
    np.minimum.at(sig, doc * cfg.bins + bin_of, value)
    sig = sig.reshape(n_docs, cfg.bins)
    return _densify(sig)


def _densify(sig: np.ndarray) -> np.ndarray:
    """Rotation densification: an empty bin takes the next non-empty bin's value (circularly),
    offset by a constant per step, so two documents agree on it exactly when they agree on the
    bin it was borrowed from."""
    empty = sig == _EMPTY
    has_any = ~empty.all(axis=1)
    todo = empty & has_any[:, None]
    step = U64(1) << U64(_MASK_BITS)  # above every bin value: borrowed values never equal real ones
    src = sig
    offset = U64(0)
    while todo.any():
        src = np.roll(src, -1, axis=1)
        offset = offset + step
        fill = todo & (src != _EMPTY)
        sig = np.where(fill, src + offset, sig)
        todo &= ~fill
    return sig


def band_keys(sig: np.ndarray, cfg: ShingleConfig) -> np.ndarray:
    """(n_docs, bands) uint64 LSH keys; a band's index is mixed in so keys of different bands differ."""
    banded = sig.reshape(len(sig), cfg.bands, cfg.rows)
    key = np.broadcast_to(np.arange(cfg.bands, dtype=U64) + U64(cfg.seed), banded.shape[:2]).copy()
    for j in range(cfg.rows):
        key = _mix(key * U64(0x9E3779B97F4A7C15) + banded[:, :, j])
    return key


def shingle_sets(texts: pl.Series, cfg: ShingleConfig) -> list[np.ndarray]:
    """Sorted unique shingle hashes of each text, for exact Jaccard / containment."""
    doc, hashes = shingle_hashes(normalize(texts), cfg)
    order = np.lexsort((hashes, doc))
    doc, hashes = doc[order], hashes[order]
    bounds = np.searchsorted(doc, np.arange(len(texts) + 1))
    return [np.unique(hashes[bounds[i] : bounds[i + 1]]) for i in range(len(texts))]


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) == 0 and len(b) == 0:
        return 1.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)
