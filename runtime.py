"""The run's plumbing: the machine, config files, checkpoints, the process group, metrics and the report.

None of this is the Xmodel-2.5 recipe (train.py, data.py, model.py, mup.py, muon.py, fp8.py are): a reader of
the recipe can skip this file. It imports no project module; train.py and the tools use it.

What a long run on shared machines needs, one section each:
- the machine: CUDA, else Apple MPS, else the CPU; bf16 autocast only where the hardware runs it natively;
- the config: a Python file of assignments, then `--key=value` overrides, checked against dataclasses,
  and `--help` generated from the dataclasses' own comments;
- files: `atomic_write` (a reader sees the old file or the new one, never half of one), sha256 checksums,
  and one run per out_dir (`RunLock`);
- checkpoints: a directory per checkpoint that every rank writes its share of, in the background
  (torch.distributed.checkpoint; `Checkpointer`), listed only once complete, a sha256 per file verified on
  load (each rank its share), keep-K, resharded on load; single files (older runs, exports) load too;
- the process group (torchrun's environment): set-up, a clean exit, a failed collective explained (which rank
  fell behind), every rank checked to resume from the same checkpoint, the command that resumes;
- metrics: metrics.jsonl exact across resumes, TensorBoard / W&B sinks, throughput;
- stopping early: preemption signals and a wall-clock time limit;
- the report: report.md and the loss plot (matplotlib, optional).
"""
import ast
import contextlib
import copy
import fcntl
import functools
import hashlib
import inspect
import json
import os
import pickle
import re
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
import typing
import warnings
from dataclasses import fields
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

# ----------------------------------------------------------------------------------------------------
# the machine: which device, which precision

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16")


def cpu_has_native_bf16() -> bool:
    """True where oneDNN has bf16 kernels for this CPU (AVX512-BF16 or AMX). Elsewhere (AVX2-only CPUs) a
    bf16 GEMM is emulated and runs about 8x slower than fp32, so bf16 autocast would slow training down."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(device: str = "auto") -> tuple[str, str]:
    """'auto' -> CUDA, else Apple MPS, else CPU (nanochat's order). Returns (device, the reason, for the log).
    MPS is chosen but never tested here (no Apple machine in CI): it runs the plain eager path."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda", f"device auto -> cuda ({torch.cuda.get_device_name()})"
        if _mps_available():
            return "mps", "device auto -> mps (Apple GPU; an untested path)"
        return "cpu", f"device auto -> cpu (no CUDA or MPS device; {torch.backends.cpu.get_cpu_capability()})"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("config key 'device': cuda requested but torch.cuda.is_available() is False "
                         "(device=auto picks what this machine has)")
    if device == "mps" and not _mps_available():
        raise ValueError("config key 'device': mps requested but torch.backends.mps.is_available() is False")
    return device, f"device {device} (as configured)"


def resolve_dtype(dtype: str, device: str) -> tuple[str, str]:
    """'auto' -> bfloat16 where the hardware runs it natively (CUDA with bf16 support, CPUs with AVX512-BF16
    or AMX), else float32. An explicit bfloat16 is kept, with a warning where it is emulated."""
    if device == "cuda":
        native, why = torch.cuda.is_bf16_supported(), "this GPU"
    elif device == "cpu":
        native, why = cpu_has_native_bf16(), f"this CPU ({torch.backends.cpu.get_cpu_capability()})"
    else:
        native, why = False, f"{device} (bf16 autocast not relied on)"
    if dtype == "auto":
        if native:
            return "bfloat16", f"dtype auto -> bfloat16: {why} has native bf16 kernels"
        return "float32", (f"dtype auto -> float32: {why} has no native bf16 kernels; bf16 would be about 8x "
                           f"slower" if device == "cpu" else f"dtype auto -> float32: {why}")
    if dtype == "bfloat16" and not native:
        return dtype, (f"warning: dtype bfloat16 as configured, but {why} has no native bf16 kernels: expect it "
                       f"to run several times slower than --dtype=float32")
    return dtype, f"dtype {dtype} (as configured)"


def resolve_machine(device: str = "auto", dtype: str = "auto", say=print) -> tuple[str, str]:
    """Both choices, printed with their reasons: what train.py and every tool call first."""
    device, why_device = resolve_device(device)
    dtype, why_dtype = resolve_dtype(dtype, device)
    say(why_device)
    say(why_dtype)
    return device, dtype


def autocast(device, dtype) -> torch.autocast:
    """The mixed-precision context of a forward: bf16 autocast when dtype is bfloat16 (a name or a torch
    dtype), a disabled one otherwise; master weights stay fp32 either way. Each use is a fresh context."""
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=dtype in ("bfloat16", torch.bfloat16))


def raise_open_files_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit, and return it. A dataset is memory-mapped
    shard by shard and each map holds a file descriptor: the real run's ~1.5T tokens in 512 MiB shards are ~11k
    maps per rank, past the usual soft limit of 1,024 (the hard limit is commonly 10^5 or more)."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def machine_info(device, world: int) -> dict:
    """What the run ran on, for config.json and the report."""
    info = {"device": str(device), "world_size": world, "torch": torch.__version__, "host": socket.gethostname()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu"] = torch.backends.cpu.get_cpu_capability()
        info["cpu_native_bf16"] = cpu_has_native_bf16()
    return info


# ----------------------------------------------------------------------------------------------------
# configuration: a Python file of assignments, then --key=value overrides, typed by dataclasses

def parse_value(s: str):
    """A command-line value: a Python literal, true/false, or else the string itself."""
    try:
        return ast.literal_eval(s)
    except (ValueError, SyntaxError):
        return {"true": True, "false": False}.get(s.lower(), s)


def read_config(argv: list[str]) -> tuple[dict, list]:
    """[CONFIG.py] [--key=value ...] -> ({key: value}, [(dotted.key, value), ...]): the file's public
    assignments overridden by the flags in order; a flag whose key holds a dot (--phase.decay.lr=...) is
    returned apart, for the caller to apply to its nested config."""
    values, dotted = {}, []
    args = list(argv)
    if args and not args[0].startswith("--"):
        path = args.pop(0)
        if not os.path.isfile(path):
            raise ValueError(f"config file not found: {path}")
        scope: dict = {}
        try:
            exec(compile(open(path).read(), path, "exec"), scope)
        except Exception as e:
            raise ValueError(f"config file {path}: {type(e).__name__}: {e}") from None
        values.update({k: v for k, v in scope.items() if not k.startswith("_")
                       and not isinstance(v, type(os)) and not callable(v)})
    for a in args:
        if not a.startswith("--"):
            raise ValueError(f"unexpected argument {a!r} (options are --key=value; see --help)")
        key, eq, raw = a[2:].partition("=")
        value = parse_value(raw) if eq else True
        if "." in key:
            dotted.append((key, value))
        else:
            values[key] = value
    return values, dotted


def build_config(cls, values: dict):
    """An instance of the dataclass `cls` from the entries of `values` that are its fields, each checked
    against the field's type (an int where a float is expected is converted; True is not an int)."""
    types = typing.get_type_hints(cls)
    return cls(**{k: _check_type(k, v, types[k]) for k, v in values.items() if k in types})


def _check_type(key, value, tp):
    if typing.get_origin(tp) is typing.Union:  # Optional[X], or one of several types (Union[int, str])
        if value is None and type(None) in typing.get_args(tp):
            return None
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        for option in options:
            with contextlib.suppress(ValueError):
                return _check_type(key, value, option)
        names = " or ".join(getattr(a, "__name__", str(a)) for a in options)  # every type it may be, not the last
        raise ValueError(f"config key {key!r}: expected {names}, got {value!r}")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and value.strip().lower() in ("inf", "+inf", "-inf", "nan"):
        return float(value)  # no literal spells them: --grad_clip=inf (no clipping), as --help says
    if tp is int and isinstance(value, bool) or not isinstance(value, typing.get_origin(tp) or tp):
        raise ValueError(f"config key {key!r}: expected {getattr(tp, '__name__', tp)}, got {value!r}")
    return value


def config_help(usage: str, sections: list) -> str:
    """--help: `usage`, then for each (dataclass, title) every field with its default and the comment beside
    it in the source (the dataclasses are the one source of truth)."""
    lines = [usage]
    for cls, title in sections:
        notes = dict(re.findall(r"^\s+(\w+):[^\n#]*#\s*(.+)$", inspect.getsource(cls), re.M))
        lines += ["", title + ":"]
        for f in fields(cls):
            default = f.default_factory() if callable(f.default_factory) else f.default
            shown = repr(default) if len(repr(default)) <= 24 else "(see the config)"
            lines.append(f"  --{f.name}={shown}".ljust(44) + notes.get(f.name, ""))
    return "\n".join(lines)


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# ----------------------------------------------------------------------------------------------------
# files: atomic writes, checksums, one run per out_dir

@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w"):
    """`with atomic_write(path) as f: ...` writes a temporary file beside `path`, fsyncs it and renames it
    over `path`: a reader sees the old file or the new one. On any error (a full disk included) `path` is
    untouched and an OSError names it and the free space left. The project's one atomic-write helper."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
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
        cause = os_error(e)
        if cause is not None and not isinstance(cause, FileNotFoundError):
            where = f": {cause.filename}" if cause.filename not in (None, str(path), str(tmp)) else ""
            free = f"; {disk_free(path.parent)}" if path.parent.is_dir() else ""
            raise OSError(cause.errno, f"could not write {path} ({cause.strerror or cause}{where}{free})") from e
        raise


def disk_free(directory) -> str:
    """The free space of a directory's file system, as the messages of a failed write give it."""
    return f"{shutil.disk_usage(directory).free / 2**30:.2f} GiB free on its file system"


def os_error(error: BaseException) -> OSError | None:
    """The OSError behind an error: the error itself, or one it was raised from or while handling. torch.save
    into a full disk raises a RuntimeError ("enforce fail at inline_container.cc ... unexpected pos") whose
    context is the OSError that says what happened (No space left on device). None if there is none."""
    seen = set()
    while isinstance(error, Exception) and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return None


def sha256_file(path) -> str:
    """The sha256 of a file's bytes, read in blocks (memory stays flat for multi-GB files)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class HashingWriter:
    """A write-only file that hashes what passes through it: one pass over the bytes both writes and
    checksums them (torch.save writes its zip sequentially; shards are appended; DCP appends tensors and asks
    where it is: tell, fileno, close pass through to the file)."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def write(self, b):
        self.sha.update(b)
        return self.f.write(b)

    def flush(self):
        self.f.flush()

    def __getattr__(self, name):
        return getattr(self.f, name)


def check_out_dir(out_dir: str, resume: bool) -> None:
    """Refused before anything is read or written: a checkpoint directory given as out_dir (meaning "resume from
    this one": it would find no checkpoint in it and train from step 0 inside it), and a fresh start in an out_dir
    holding another run's checkpoints (nothing is overwritten)."""
    if os.path.isfile(os.path.join(out_dir, MANIFEST)):
        parent = os.path.dirname(os.path.normpath(out_dir)) or "."
        raise ValueError(f"out_dir {out_dir!r} is a checkpoint (or dataset) directory, not a run's: continue its "
                         f"run with --out_dir={parent} --resume, or start from its weights with --init_from={out_dir}")
    if not resume and list_checkpoints(out_dir):
        raise ValueError(f"out_dir {out_dir!r} holds checkpoints of an earlier run: continue it with --resume, "
                         f"or choose another out_dir")


class RunLock:
    """One run per out_dir: an exclusive flock on out_dir/.lock, held for the run's life. The kernel drops
    it when the process dies however it dies, so a stale lock never blocks a resume; the file holds the
    holder's PID and host for the message a second run gets."""

    def __init__(self, out_dir: str):
        self.path = os.path.join(out_dir, ".lock")
        try:
            os.makedirs(out_dir, exist_ok=True)
            self.f = open(self.path, "a+")
        except OSError as e:  # a file in the way, a read-only file system: say which key, not just an errno
            raise OSError(e.errno, f"out_dir {out_dir!r} is not a directory this run can write ({e.strerror}: "
                                   f"{e.filename})") from None
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.f.seek(0)
            holder = self.f.read().strip() or "unknown"
            self.f.close()
            raise ValueError(f"out_dir {out_dir!r} is in use by another run ({holder}); wait for it or choose "
                             f"another out_dir") from None
        self.f.seek(0)
        self.f.truncate()
        self.f.write(f"PID {os.getpid()} on {socket.gethostname()}\n")
        self.f.flush()
        os.fsync(self.f.fileno())  # the other ranks read it to check that they see this out_dir (agree_on_checkpoint)
        for name in os.listdir(out_dir):  # what a run that died mid-write left (never listed, just space)
            path = os.path.join(out_dir, name)
            if ".tmp-" in name:
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)

    def release(self) -> None:
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


# ----------------------------------------------------------------------------------------------------
# checkpoints: a directory per checkpoint, every rank writing its share (torch.distributed.checkpoint)
#
# out_dir/ckpt_<step>/ holds
#   __<rank>_0.distcp  a rank's share of the tensors (weights, optimizer state), DCP's files
#   .metadata          DCP's index: which tensor lies where (a pickle, read through an allow-list)
#   meta.pt            the rest, small: step, tokens, configs, tokenizer, RNG states, the optimizers' groups
#   manifest.json      written last: the format, the step, the sha256 of every other file
# It is written as out_dir/.ckpt_<step>.tmp-dcp and renamed by rank 0 once every rank's part is complete: a
# listed checkpoint is whole. An older run's single file, ckpt_<step>.pt with its .sha256, still loads, and
# `python -m tools.export --to_file CKPT OUT.pt` writes one.

CKPT_FORMAT = "xmodel25-checkpoint-v1"   # the nested layout, as a single file's whole content and as read back
CKPT_DIR_FORMAT = "xmodel25-dcp-v1"      # a checkpoint directory's manifest
MANIFEST = "manifest.json"
_CKPT_RE = re.compile(r"^ckpt_(\d{8})(\.pt)?$")


def write_checkpoint_file(path: str, state: dict) -> str:
    """A whole checkpoint (`state` in the nested layout read_checkpoint returns) as one file, written atomically
    with the sha256 of its bytes in PATH.sha256 (renamed into place just before the file itself, so a listed
    checkpoint has its checksum)."""
    with atomic_write(path, "wb") as f:
        out = HashingWriter(f)
        torch.save(dict(state, format=CKPT_FORMAT), out)
        with atomic_write(path + ".sha256") as g:
            g.write(out.sha.hexdigest() + "\n")
    return path


def save_checkpoint(out_dir: str, step: int, state: dict, keep: int) -> str:
    """out_dir/ckpt_<step>.pt as one file (write_checkpoint_file), then all but the newest `keep` checkpoints
    removed. The trainer writes directories (Checkpointer); a single file is what an import writes."""
    path = write_checkpoint_file(os.path.join(out_dir, f"ckpt_{step:08d}.pt"), dict(state, step=step))
    prune_checkpoints(out_dir, keep)
    return path


def list_checkpoints(out_dir: str) -> list[str]:
    """Complete checkpoints in out_dir, oldest first: directories holding their manifest (the last file
    written) and single files. What a crash leaves half-written is never listed."""
    if not os.path.isdir(out_dir):
        return []
    found = []
    for name in os.listdir(out_dir):
        m, path = _CKPT_RE.match(name), os.path.join(out_dir, name)
        if m and (m.group(2) or os.path.isfile(os.path.join(path, MANIFEST))):
            found.append((int(m.group(1)), name, path))
    return [path for *_, path in sorted(found)]


def prune_checkpoints(out_dir: str, keep: int) -> None:
    """Remove all but the newest `keep` checkpoints. A directory is renamed to a temporary name first: unlisted at
    once, and what a kill during its removal leaves, the next run's RunLock clears."""
    for old in list_checkpoints(out_dir)[:-keep]:
        if os.path.isdir(old):
            doomed = os.path.join(out_dir, f".{os.path.basename(old)}.tmp-prune")
            shutil.rmtree(doomed, ignore_errors=True)
            os.rename(old, doomed)
            shutil.rmtree(doomed)
        else:
            for p in (old, old + ".sha256"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(p)


def resolve_checkpoint(path: str) -> str:
    """A checkpoint (directory or file) as given, or a run directory's latest. A file of a checkpoint directory
    is refused: meta.pt alone reads as a checkpoint without its weights."""
    folder = os.path.dirname(path)
    if os.path.isfile(path) and os.path.isfile(os.path.join(folder, MANIFEST)):
        raise ValueError(f"{path} is one file of the checkpoint directory {folder}: give the directory (or its run's)")
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, MANIFEST)):
        found = list_checkpoints(path)
        if not found and os.path.isfile(os.path.join(path, "config.json")):  # an exported Hugging Face folder
            raise FileNotFoundError(f"no checkpoint (ckpt_*) in {path}, a Hugging Face folder: make it one with "
                                    f"python -m tools.export --import {path} OUT_DIR")
        if not found:
            raise FileNotFoundError(f"no checkpoint (ckpt_*) in {path}")
        return found[-1]
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path


def _manifest(path: str) -> dict:
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a checkpoint directory ({MANIFEST}: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != CKPT_DIR_FORMAT:
        raise ValueError(f"{path}: not a checkpoint directory of this project (format {CKPT_DIR_FORMAT})")
    return manifest


def verify_checkpoint(path: str, rank: int = 0, world: int = 1) -> str | None:
    """Check the sha256 of this rank's share of a checkpoint's files (every world-th, from `rank`; a single file
    is one share): None if they match, else the error, naming the file and the previous good checkpoint."""
    if os.path.isdir(path):
        listed = sorted(_manifest(path)["files"].items())
        files = [(os.path.join(path, name), digest, f"{name}: sha256 differs from {MANIFEST}")
                 for name, digest in listed]
    elif os.path.exists(path + ".sha256"):
        files = [(path, open(path + ".sha256").read().strip(), f"sha256 differs from {path}.sha256")]
    else:
        files = []
    for file, digest, why in files[rank::world]:
        if not os.path.isfile(file):
            why = f"{os.path.basename(file)} is missing"
        elif sha256_file(file) == digest:
            continue
        return f"{path}: corrupt checkpoint ({why}); {_previous_hint(path)}"
    return None


def _previous_hint(path: str) -> str:
    path = os.path.normpath(path)
    found = [os.path.normpath(p) for p in list_checkpoints(os.path.dirname(path) or ".")]
    earlier = found[:found.index(path)] if path in found else found
    return (f"the previous checkpoint is {earlier[-1]}: move the corrupt one aside to resume from it" if earlier
            else "there is no earlier checkpoint in that directory")


def read_checkpoint(path: str, want=None) -> dict:
    """A checkpoint's content in the nested layout ({"model": {name: tensor}, "optim": {"kind", "rest",
    "hidden"}, "step", "tokens", "config", ...}), unverified (verify_checkpoint checks it). From a directory,
    `want` picks the tensors to read: given the small part read first (meta.pt: step, configs, the optimizers'
    groups), it returns a test of a tensor's flat key ("model/tok_emb.weight", "optim/rest/state/0/exp_avg"),
    so that a rank reads only its own share of sharded optimizer state. All are read by default; a single
    file is read whole. Nothing in either can execute code: tensors and plain data only."""
    if not os.path.isdir(path):
        return _read_file(path)
    _manifest(path)
    content = _read_file(os.path.join(path, "meta.pt"))
    try:
        tensors = _read_tensors(path, want(content) if want else None)
    except (ValueError, FileNotFoundError):
        raise
    except Exception as e:  # a damaged index or data file
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e)[:300]})") from None
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        if not type(e).__name__ == "CheckpointException":
            raise
        if _interrupted(e):  # Ctrl-C while reading: the checkpoint is fine, say so as an interruption
            raise KeyboardInterrupt from None
        raise ValueError(f"{path}: not a readable checkpoint ({_first_failure(e)})") from None
    for key, t in tensors.items():  # "optim/rest/state/3/exp_avg" -> content["optim"]["rest"]["state"][3]["exp_avg"]
        *parents, leaf = [int(k) if k.isdigit() else k for k in key.split("/")]
        node = content
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = t
    return content


def _read_file(path: str) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint file {path} does not exist") from None
    except Exception as e:  # truncated zip, foreign pickle, disallowed global, ...
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise ValueError(f"{path}: not an Xmodel-2.5 checkpoint of this project (format {CKPT_FORMAT})")
    return ckpt


def _read_tensors(path: str, want) -> dict:
    dcp, IndexReader, TensorsOnly = _dcp()
    reader = IndexReader(path)
    tensors = {}
    for key, md in reader.read_metadata().state_dict_metadata.items():
        if want is None or want(key):
            if not isinstance(md, dcp.TensorStorageMetadata):
                raise ValueError(f"{path}: entry {key!r} is not a tensor")
            tensors[key] = torch.empty(md.size, dtype=md.properties.dtype)
    if tensors:
        _single_process_is_no_news()
        dcp.load(tensors, storage_reader=reader, planner=TensorsOnly(), no_dist=True)
    return tensors


def _single_process_is_no_news() -> None:
    # DCP warns on every save and load without a process group, even with no_dist=True, as asked here
    warnings.filterwarnings("ignore", "torch.distributed is disabled, unavailable or uninitialized", UserWarning)


def load_checkpoint(path: str) -> dict:
    """A checkpoint (a directory, a single file, or a run directory's latest) verified whole and read whole, in
    the nested layout: what the tools use. Flipped bytes are refused, naming the previous good checkpoint."""
    path = resolve_checkpoint(path)
    problem = verify_checkpoint(path)
    if problem:
        raise ValueError(problem)
    return read_checkpoint(path)


class _IndexUnpickler(pickle.Unpickler):
    """DCP's index (.metadata) is a pickle: only DCP's own metadata classes, torch.Size, dtypes and paths may be
    named in it, so a crafted checkpoint cannot run code while it is read (its tensors are read with
    torch.load(weights_only=True), and objects other than tensors are refused: _dcp's TensorsOnly)."""
    ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
               ("pathlib", "PurePosixPath"), ("collections", "OrderedDict"),
               ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}
    METADATA = "torch.distributed.checkpoint.metadata"

    def find_class(self, module, name):
        found = (module, name) in self.ALLOWED or module == self.METADATA or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        obj = super().find_class(module, name) if found else None
        if obj is None or module == self.METADATA and not (isinstance(obj, type) and obj.__module__ == module):
            raise pickle.UnpicklingError(f"{module}.{name} has no place in a checkpoint index")
        return obj


@functools.cache
def _dcp():
    """torch.distributed.checkpoint (imported on first use: 0.7 s) and the reader and load planner that make
    reading it safe: the index through _IndexUnpickler, and tensors only."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import StorageMeta

    class IndexReader(dcp.FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with open(os.path.join(self.path, ".metadata"), "rb") as f:
                metadata = _IndexUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class TensorsOnly(dcp.DefaultLoadPlanner):
        def load_bytes(self, read_item, value):  # DCP would unpickle the object with weights_only=False
            raise ValueError(f"checkpoint entry {read_item.dest_index.fqn!r} is a pickled object; only tensors "
                             f"are read")

    return dcp, IndexReader, TensorsOnly


def replicated_share(sizes: dict, world: int) -> dict:
    """{key: the rank that writes it} for entries every rank holds alike ({key: bytes}): the largest first, each
    to the least-loaded rank. Every rank computes the same answer from the same entries, with no message."""
    load, owner = [0] * world, {}
    for key in sorted(sizes, key=lambda k: (-sizes[k], k)):
        owner[key] = min(range(world), key=load.__getitem__)
        load[owner[key]] += sizes[key]
    return owner


def _write_shards(tensors: dict, path: str, group) -> dict:
    """This rank's tensors into the checkpoint directory `path` (one file per rank), with every other rank of
    `group`: DCP's save, whose last act (rank 0 writing the index) all ranks wait for. Returns {file name:
    sha256} of the files this rank wrote, hashed as they were written (no second pass over the bytes)."""
    dcp = _dcp()[0]
    _single_process_is_no_news()
    writer = dcp.FileSystemWriter(path, single_file_per_rank=True, sync_files=True)
    hashes = {}
    writer.fs = _hashing_file_system(hashes)
    dcp.save(tensors, storage_writer=writer, process_group=group, no_dist=group is None)
    return hashes


def _hashing_file_system(hashes: dict):
    """DCP's file system, with every file it writes hashed on the way (recorded in `hashes` by name, followed
    through DCP's renames). Should DCP write by other means, rank 0 hashes what no rank reported (_publish)."""
    from torch.distributed.checkpoint.filesystem import FileSystem

    class HashingFileSystem(FileSystem):
        @contextlib.contextmanager
        def create_stream(self, path, mode):
            with super().create_stream(path, mode) as f:
                if "w" not in mode:
                    yield f
                    return
                out = HashingWriter(f)
                yield out
            hashes[os.path.basename(path)] = out.sha.hexdigest()

        def rename(self, path, new_path):
            super().rename(path, new_path)
            if os.path.basename(path) in hashes:
                hashes[os.path.basename(new_path)] = hashes.pop(os.path.basename(path))

    return HashingFileSystem()


def _first_failure(error: BaseException) -> str:
    """The first failure in one line: where DCP gathered one per rank (CheckpointException), with the rank."""
    failures = getattr(error, "failures", None)  # {rank: (exception, traceback)}
    where = ""
    if failures:
        rank, failure = sorted(failures.items())[0]
        error, where = (failure[0] if isinstance(failure, tuple) else failure), f"rank {rank}: "
    cause = os_error(error)
    if cause is not None and cause.strerror:
        return where + cause.strerror
    return where + (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def _interrupted(error: BaseException) -> bool:
    """Whether DCP gathered a KeyboardInterrupt as a rank's failure (it catches BaseException while reading)."""
    failures = (getattr(error, "failures", None) or {}).values()
    return any(isinstance(f[0] if isinstance(f, tuple) else f, KeyboardInterrupt) for f in failures)


def _write_error(path: str, error: BaseException) -> str:
    """One line for a failed checkpoint write: the checkpoint, the first failure, the free space left."""
    parent = os.path.dirname(path)
    free = shutil.disk_usage(parent).free if os.path.isdir(parent) else 0
    return f"could not write {path} ({_first_failure(error)}; {free / 2**30:.2f} GiB free on its file system)"


def checkpoint_parts(model, optimizers: dict, world: int) -> tuple[dict, dict, dict]:
    """A model and its optimizers ({slot: torch optimizer}) as Checkpointer takes them: ({slot: the optimizer's
    param groups}, {flat key: tensor} alike on every rank (the weights, unsharded optimizer state), {flat key:
    tensor} of this rank alone (ZeRO-1's shards)). Keys: "model/NAME", "optim/SLOT/state/INDEX/NAME"."""
    optim, replicated, owned = {}, {}, {}
    for slot, opt in optimizers.items():
        state, optim[slot], sharded = optimizer_parts(opt, world)
        (owned if sharded else replicated).update(
            {f"optim/{slot}/state/{i}/{name}": v for i, s in state.items() for name, v in s.items()})
    replicated.update({f"model/{k}": v for k, v in model.state_dict().items()})
    return optim, replicated, owned


def optimizer_parts(opt, world: int) -> tuple[dict, dict, bool]:
    """An optimizer's checkpoint, with nothing gathered: (this rank's state {index: {name: tensor}}, the rest of
    its state dict {"param_groups": ...}, whether the state is this rank's share only). Indices are torch's
    state_dict numbering (the parameters of opt.param_groups in order), so the ranks' parts add up to the
    unsharded optimizer's state_dict(). ZeRO-1's ZeroRedundancyOptimizer keeps its share in opt.optim (its
    optimizer over this rank's partition), Muon(shard_state=True) its own in opt.state."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    params = [p for g in opt.param_groups for p in g["params"]]
    index = {id(p): i for i, p in enumerate(params)}
    zero = isinstance(opt, ZeroRedundancyOptimizer)
    sharded = zero or (getattr(opt, "shard_state", False) and world > 1)
    state = {index[id(p)]: dict(s) for p, s in (opt.optim if zero else opt).state.items()}
    for i, s in state.items():
        for name, v in s.items():
            if not torch.is_tensor(v):
                raise ValueError(f"optimizer state {name!r} of parameter {i} is a {type(v).__name__}, not a tensor: "
                                 f"a checkpoint holds tensors")
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[id(p)] for p in g["params"]]}
              for g in opt.param_groups]
    return state, {"param_groups": groups}, sharded


def held_indices(opt, rank: int, world: int) -> set | None:
    """The parameters (optimizer_parts' indices) whose state this rank keeps: ZeRO-1's partition, the matrices
    Muon(shard_state) orthogonalizes here; None = all of them."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    params = [p for g in opt.param_groups for p in g["params"]]
    if isinstance(opt, ZeroRedundancyOptimizer):
        mine = {id(p) for g in opt.optim.param_groups for p in g["params"]}
    elif getattr(opt, "shard_state", False) and world > 1:
        owners = opt.owners(world)
        mine = {id(p) for p in params if owners[p] == rank}
    else:
        return None
    return {i for i, p in enumerate(params) if id(p) in mine}


def read_start(source: str, rank: int, world: int, optimizers_for) -> tuple[dict | None, str | None]:
    """(what this rank needs of the checkpoint to start from, or None; the problem that stopped it, or None): its
    share of the files verified, then the weights and the optimizer state this rank keeps of the optimizers
    `optimizers_for(meta)` returns ({slot: optimizer}, set up from the checkpoint's small part meta.pt: which
    state a rank keeps may depend on it; None: the weights alone). A problem is returned, not raised, so that
    every rank reaches the comparison of what they found (agree_on_checkpoint)."""
    def want(meta):
        optimizers = optimizers_for(meta)
        if optimizers is None:
            return lambda key: key.startswith("model/")
        held = {slot: held_indices(opt, rank, world) for slot, opt in optimizers.items()}

        def wanted(key: str) -> bool:  # "model/NAME" or "optim/SLOT/state/INDEX/NAME"
            if not key.startswith("optim/"):
                return True
            _, slot, _, i, _ = key.split("/")
            return held[slot] is None or int(i) in held[slot]
        return wanted

    try:
        source = resolve_checkpoint(source)
        problem = verify_checkpoint(source, rank, world)
        return (None, problem) if problem else (read_checkpoint(source, want), None)
    except (ValueError, OSError) as e:
        return None, str(e)


class Checkpointer:
    """The run's checkpoints, written by every rank at once, in the background (torch.distributed.checkpoint).

    `save` is the part training waits for: it waits for the checkpoint still in flight (at most one is), copies
    this rank's share of the tensors to CPU memory (training goes on changing the originals) and starts a thread
    that writes them. A replicated tensor (the weights; optimizer state without ZeRO-1) is written by one rank
    (replicated_share); a sharded one (ZeRO-1's optimizer state) by the rank that holds it, as it is: nothing is
    gathered. The thread then hashes this rank's files; rank 0, once every rank's part is complete, writes
    meta.pt's checksum and the manifest, renames .ckpt_<step>.tmp-dcp to ckpt_<step> and prunes to the newest
    `keep`; every rank learns the outcome (`wait`). The thread's collectives run on a process group of their
    own (gloo, timeout ckpt_timeout_s), so they never interleave with training's.

    dcp.async_save is the same two halves (stage, then dcp.save in a thread), but it stages every tensor on
    every rank and has no step after the write; this stages 1/world of the replicated state and completes the
    checkpoint (checksums, manifest, rename) in the same thread."""

    def __init__(self, out_dir: str, keep: int, rank: int = 0, world: int = 1, timeout_s: int = 3600):
        self.out_dir, self.keep, self.rank, self.world = out_dir, keep, rank, world
        self.group = gloo_group(world, timeout_s)
        self.thread, self.outcome = None, {}  # the write in flight; what it ended with
        self.buffers = {}                     # the staging copies, reused by the next checkpoint
        self.last = None                      # the last checkpoint this process completed
        self.write_s = None                   # how long that one took, from save() to complete
        self.timings = []                     # (step, seconds training waited, seconds to complete), per save

    def save(self, step: int, meta: dict, replicated: dict, owned: dict) -> float:
        """Start the checkpoint of `step`: `meta` is the small rest (rank 0's is written), `replicated` {flat key:
        tensor} is alike on every rank, `owned` this rank's alone. Returns the seconds training waited."""
        t0 = time.perf_counter()
        self.wait()
        meta = copy.deepcopy(meta) if self.rank == 0 else None  # the caller goes on changing what it refers to
        owner = replicated_share({k: v.numel() * v.element_size() for k, v in replicated.items()}, self.world)
        staged = self._stage({**{k: v for k, v in replicated.items() if owner[k] == self.rank}, **owned})
        self.outcome = {"step": step, "t0": t0}
        self.thread = threading.Thread(target=self._write, args=(step, staged, meta),
                                       name=f"checkpoint {step}", daemon=True)
        self.thread.start()
        self.outcome["blocking_s"] = time.perf_counter() - t0
        return self.outcome["blocking_s"]

    def _stage(self, tensors: dict) -> dict:
        """Copies of `tensors` in CPU memory, into the buffers of the previous checkpoint where the shapes are
        the same (fresh pages cost as much as the copy; pinned ones make a GPU's copy fast and asynchronous)."""
        old, self.buffers = self.buffers, {}
        for key, t in tensors.items():
            buf = old.get(key)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.device.type == "cuda")
            self.buffers[key] = buf.copy_(t.detach(), non_blocking=True)
        if any(t.device.type == "cuda" for t in tensors.values()):
            torch.cuda.synchronize()
        return dict(self.buffers)

    def wait(self) -> str | None:
        """Wait for the checkpoint in flight, if any. Returns the path of the last complete one; raises OSError
        (on every rank) if the one in flight failed."""
        if self.thread is not None:
            self.thread.join()
            self.thread, done = None, self.outcome
            self.timings.append((done["step"], done["blocking_s"], done["total_s"]))
            if done.get("error"):
                raise OSError(done["error"])
            self.last, self.write_s = done["path"], done["total_s"]
        return self.last

    def in_flight(self) -> bool:
        return self.thread is not None

    def _write(self, step: int, tensors: dict, meta: dict | None) -> None:
        final = os.path.join(self.out_dir, f"ckpt_{step:08d}")
        tmp = os.path.join(self.out_dir, f".ckpt_{step:08d}.tmp-dcp")
        hashes, error = {}, None
        try:
            hashes = _write_shards(tensors, tmp, self.group)  # the first collective: a failure here is every rank's
            if meta is not None:
                with atomic_write(os.path.join(tmp, "meta.pt"), "wb") as f:
                    out = HashingWriter(f)
                    torch.save(dict(meta, format=CKPT_FORMAT, step=step), out)
                hashes["meta.pt"] = out.sha.hexdigest()
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            error = _write_error(final, e)
        try:
            error = self._complete(step, tmp, final, hashes, error)
        except BaseException as e:  # a rank is gone: the collectives themselves failed
            error = f"could not complete {final}: the other ranks did not answer ({_first_failure(e)})"
        finally:
            self.outcome.update(path=final, error=error, total_s=time.perf_counter() - self.outcome["t0"])
            if error and self.rank == 0:  # said at once; the run stops at its next wait (save, or the end)
                print(f"checkpoint {step} failed: {error}; the run stops at the next checkpoint or its end, the "
                      f"last good one ({self.last or 'none yet'}) is kept", flush=True)

    def _complete(self, step: int, tmp: str, final: str, hashes: dict, error: str | None) -> str | None:
        """Every rank's hashes and errors to rank 0, which publishes the checkpoint (or removes the partial one);
        its outcome back to every rank. Returns the error, if any."""
        parts = [(hashes, error)]
        if self.group is not None:
            parts = [None] * self.world if self.rank == 0 else None
            dist.gather_object((hashes, error), parts, dst=0, group=self.group)
        outcome = [None]
        if self.rank == 0:
            errors = [e for _, e in parts if e]
            try:
                if errors:
                    shutil.rmtree(tmp, ignore_errors=True)
                    outcome[0] = errors[0]
                else:
                    self._publish(step, tmp, final, {n: h for part, _ in parts for n, h in part.items()})
            except OSError as e:
                outcome[0] = _write_error(final, e)
        if self.group is not None:
            dist.broadcast_object_list(outcome, src=0, group=self.group)
        return outcome[0]

    def _publish(self, step: int, tmp: str, final: str, hashes: dict) -> None:
        """Rank 0, every rank's part complete: the manifest (the sha256 of every file, as hashed while written;
        should DCP write a file by other means, rank 0 hashes it here) written last, then the rename that makes
        the checkpoint listed."""
        for name in sorted(os.listdir(tmp)):
            if name not in hashes:
                hashes[name] = sha256_file(os.path.join(tmp, name))
        with atomic_write(os.path.join(tmp, MANIFEST)) as f:
            json.dump({"format": CKPT_DIR_FORMAT, "step": step, "world_size": self.world,
                       "files": dict(sorted(hashes.items()))}, f, indent=1)
        old = tmp + "-old"
        if os.path.exists(final):  # the same step written again (a resumed run that stopped at once)
            os.replace(final, old)
        os.replace(tmp, final)
        fd = os.open(self.out_dir, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself on disk
        finally:
            os.close(fd)
        shutil.rmtree(old, ignore_errors=True)
        prune_checkpoints(self.out_dir, self.keep)


# ----------------------------------------------------------------------------------------------------
# the process group (torchrun provides RANK / WORLD_SIZE / LOCAL_RANK)

class CollectiveFailure(RuntimeError):
    """A collective failed or timed out because a rank died or hung; the message names the ranks behind."""


def gloo_group(world: int, timeout_s: int):
    """A process group of every rank on gloo, for collectives of host memory that must not queue behind the
    device's work (nccl's do) or interleave with training's; None for one process, which creates none.
    new_group is itself collective: every rank creates its groups at the same points, in the same order."""
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)) if world > 1 else None


def setup_distributed(device: str, timeout_s: int) -> tuple[int, int, torch.device]:
    """(rank, world size, this rank's device); joins the process group when torchrun started several ranks.
    The timeout bounds how long a collective waits for a dead or hung rank before failing the job."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        torch.cuda.set_device(local)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    return rank, world, torch.device(f"cuda:{local}" if device == "cuda" else device)


def exit_distributed(code: int = 0) -> None:
    """The last act of a process of a multi-process run whose work is done (results written, files closed):
    destroy the process group and exit without Python's finalization. A gloo worker thread may still drop the
    last reference to a tensor of the last collectives (a barrier holds its prior work); if that happens
    while the interpreter finalizes, the thread cannot take the GIL and the process aborts with SIGABRT
    ("terminate called without an active exception") although everything succeeded (seen in about 1 of 10
    runs of a 2-rank Muon test; pytorch/pytorch#179291 describes the mechanism)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


_PROGRESS_KEY = "xmodel25/step/{}"


def note_progress(rank: int, step: int) -> None:
    """Record in the rendezvous key-value store (torchrun's, which outlives the workers) the step this
    rank is starting, so that after a failed collective the survivors can name the rank that fell behind."""
    dist.distributed_c10d._get_default_store().set(_PROGRESS_KEY.format(rank), str(step))


def is_collective_failure(error: BaseException) -> bool:
    """gloo raises RuntimeError (DistBackendError) on a dead peer or a timeout; nccl raises DistError."""
    text = str(error)
    return isinstance(error, dist.DistError) or any(
        w in text for w in ("Connection closed by peer", "Connection reset", "Broken pipe", "Timed out", "timed out"))


def collective_failure(error: BaseException, timeout_s: int) -> CollectiveFailure:
    """The error for a collective that failed (a peer's connection closed) or timed out: this rank, the
    timeout, the last step each rank started and which rank(s) fell behind (died or hung)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    steps = {}
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=5))
        for r in range(world):
            if store.check([_PROGRESS_KEY.format(r)]):
                steps[r] = int(store.get(_PROGRESS_KEY.format(r)))
    except Exception:  # the store lived in a rank that is gone: report without it
        pass
    behind = sorted(r for r in range(world) if r not in steps or steps[r] < max(steps.values(), default=0))
    blame = (f"rank(s) {behind} fell behind (died or hung)" if behind else
             "every rank reached the same step; one of them died or hung inside it")
    detail = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    return CollectiveFailure(
        f"rank {rank}: a collective failed or timed out (dist_timeout_s={timeout_s}) waiting for the other "
        f"ranks; last step started per rank: {steps}; {blame}. ({type(error).__name__}: {detail})")


def settle_ddp_buckets(ddp, model, dtype: str, device) -> None:
    """A resumed run's buckets as the uninterrupted run's. DDP reduces its first iteration's gradients in one
    bucket, then rebuilds its buckets in the order the gradients became ready. With more than two ranks the
    ring all-reduce adds an element's addends in an order that depends on where the element lies in its
    bucket, so the first step after a resume would round differently from the same step of the uninterrupted
    run (which used the rebuilt buckets). One throwaway forward and backward on a dummy batch, its gradients
    dropped and every buffer (FP8 amaxes and scales) put back, makes the rebuild happen here."""
    buffers = [b.clone() for b in model.buffers()]
    x = torch.zeros(1, 8, dtype=torch.long, device=device)
    with autocast(device, dtype):
        loss = ddp(x, x)
    loss.backward()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for b, saved in zip(model.buffers(), buffers):
            b.copy_(saved)


def agree_on_checkpoint(rank: int, world: int, out_dir: str, mine: dict) -> None:
    """After each rank found, verified (its share) and read the checkpoint to start from, one all_gather
    compares what they hold: mine = {"checkpoint": path or None, "step", "tokens", "problem": an error or None,
    and optionally "data": {source: (dataset directory, fingerprint)}}.
    Raises ValueError on every rank, naming the ranks, if one does not see rank 0's out_dir (the lock file rank 0
    holds in it, also on a fresh start), if one reads other data (a dataset's fingerprint differs), if one found a
    damaged checkpoint, if some found none while others did, or if they disagree (each node seeing its own out_dir
    is the usual cause)."""
    try:
        with open(os.path.join(out_dir, ".lock")) as f:
            lock = f.read()
    except OSError:
        lock = None
    mine = {**mine, "out_dir": out_dir, "lock": lock}
    views = [mine]
    if world > 1:
        views = [None] * world
        dist.all_gather_object(views, mine)
    _same_out_dir(views)
    _same_data(views)
    problems = [(r, v["problem"]) for r, v in enumerate(views) if v["problem"]]
    if problems:
        raise ValueError(problems[0][1] if world == 1 else f"rank {problems[0][0]}: {problems[0][1]}")
    held = {}
    for r, v in enumerate(views):
        held.setdefault((v["checkpoint"], v["step"], v["tokens"]), []).append(r)
    if len(held) == 1:
        return
    cause = (f"out_dir {out_dir!r} is probably not shared: every rank must see the same one, a directory on a "
             f"file system all nodes mount")
    none = [ranks for (path, *_), ranks in held.items() if path is None]
    if none:
        found = "; ".join(f"rank(s) {ranks} found {path}" for (path, *_), ranks in held.items() if path is not None)
        raise ValueError(f"rank(s) {none[0]} found no checkpoint to resume from, while {found}: {cause}")
    raise ValueError("the ranks disagree on the checkpoint to resume from: " + "; ".join(
        f"rank(s) {ranks}: {path} (step {step}, {tokens:,} tokens)" for (path, step, tokens), ranks in held.items())
        + f": {cause} (or another run wrote into it meanwhile)")


def _same_out_dir(views: list[dict]) -> None:
    """Every rank reads the .lock rank 0 holds in out_dir: a rank that does not sees another directory."""
    elsewhere = [r for r, v in enumerate(views) if v["lock"] != views[0]["lock"]]
    if elsewhere:
        theirs = ", ".join(sorted({repr(views[r]["out_dir"]) for r in elsewhere}))
        raise ValueError(f"rank(s) {elsewhere} do not see rank 0's out_dir {views[0]['out_dir']!r} (the .lock rank 0 "
                         f"holds in it; they use {theirs}): every rank must see the same one, a directory on a "
                         f"file system all nodes mount")


def _same_data(views: list[dict]) -> None:
    """Every rank's datasets have rank 0's fingerprints (node-local copies of the same data may lie elsewhere)."""
    def fingerprints(v):
        return {source: fp for source, (_, fp) in (v.get("data") or {}).items()}

    def where(d):
        return f"{d[0]} (fingerprint {str(d[1])[:12]})" if d else "no such source"

    other = [r for r, v in enumerate(views) if fingerprints(v) != fingerprints(views[0])]
    if other:
        ours, theirs = views[0].get("data") or {}, views[other[0]].get("data") or {}
        a, b = fingerprints(views[0]), fingerprints(views[other[0]])
        source = sorted(s for s in {*a, *b} if a.get(s) != b.get(s))[0]
        raise ValueError(f"rank(s) {other} read other data than rank 0: source {source!r} is "
                         f"{where(theirs.get(source))} on rank {other[0]}, {where(ours.get(source))} on rank 0: "
                         f"every rank must read the same prepared data (the same `data`, `data_cache` / "
                         f"$XMODEL_CACHE on a file system all nodes mount, the same Python for the default corpus)")


def _agent_command() -> list[str] | None:
    """torchrun's own command line, as typed (Linux: the parent process's /proc entry), or None."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            argv = [a.decode() for a in f.read().split(b"\0") if a]
    except OSError:
        return None
    for i, a in enumerate(argv[:3]):
        if os.path.basename(a) == "torchrun":
            return ["torchrun", *argv[i + 1:]]
        if a == "-m" and i + 1 < len(argv) and argv[i + 1] in ("torch.distributed.run", "torch.distributed.launch"):
            return ["python", *argv[i:]]
    return None


def launch_command(script: str, argv: list[str]) -> str:
    """The command that started this run, for the resume hint, with --resume added unless it is there: under
    torchrun the agent's own command line (every flag as typed: rendezvous, signals, shutdown timeout), else one
    rebuilt from torchrun's environment (a multi-node job's rendezvous endpoint is not in it: HOST:PORT);
    alone, `python SCRIPT ARGV`."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        cmd = ["python", script, *argv]
    else:
        nodes = os.environ.get("GROUP_WORLD_SIZE", "1")
        rdzv = [] if nodes == "1" else ["--rdzv-backend=c10d", "--rdzv-endpoint=HOST:PORT"]
        cmd = _agent_command() or ["torchrun", f"--nnodes={nodes}",
                                   f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', '1')}", *rdzv, script, *argv]
    if not any(a == "--resume" or a.startswith("--resume=") for a in cmd):
        cmd.append("--resume")
    return shlex.join(cmd)


def max_over_ranks(value: int, world: int, device) -> int:
    """The largest of the ranks' values, on every rank (e.g. a stop reason that reached one rank first)."""
    if world == 1:
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def any_rank(flag: bool, world: int, device) -> bool:
    """True on every rank if it is True on any."""
    return bool(max_over_ranks(int(flag), world, device))


def to_device(tensors, device: torch.device) -> list:
    """Host tensors (a batch) copied to the training device without the host waiting for the copy: on CUDA
    each goes through pinned memory first (a host copy of a few hundred KB into pages the caching allocator
    keeps, not reused before the copy is done), since a non_blocking copy from pageable memory is not
    asynchronous to the host."""
    pin = device.type == "cuda"
    return [(t.pin_memory() if pin else t).to(device, non_blocking=True) for t in tensors]


def all_reduce_mean(t: torch.Tensor, world: int) -> torch.Tensor:
    """The mean of `t` over the ranks (a new tensor; `t` itself when there is one rank)."""
    if world > 1:
        t = t.clone()
        dist.all_reduce(t)
        t /= world
    return t


def run_main(main, argv: list[str]) -> None:
    """A command's entry point under torchrun or alone: bad input, a missing or damaged file, a non-finite
    loss or a full disk ends in one line on stderr naming the rank, and exit status 1; Ctrl-C (SIGINT) in one
    line too (what the interrupted command says is safe), exit status 130 as the shell's; a broken process
    group exits at once (tearing it down could wait on the dead rank again); a finished rank of a
    multi-process job leaves through exit_distributed."""
    try:
        main(argv)
    except CollectiveFailure as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        os._exit(1)
    except (ValueError, FileNotFoundError, FloatingPointError, OSError) as e:
        where = f"rank {dist.get_rank()}: " if dist.is_initialized() else ""
        print(f"error: {where}{e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:
        where = f"rank {dist.get_rank()}: " if dist.is_initialized() else ""
        print(f"interrupted (SIGINT): {where}{e or 'stopped'}", file=sys.stderr, flush=True)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        exit_distributed()


# ----------------------------------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def heldout_loss(model, batches, device="cpu", autocast=None, rank: int = 0, world: int = 1) -> float:
    """Token-weighted mean next-token loss over (x, y) batches, the one held-out evaluator of the project
    (the trainer, the evaluation tool and the μP tools). Under torch.distributed each rank takes every
    world-th batch and the sums are all-reduced, so the value does not depend on the number of ranks."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for i, (x, y) in enumerate(batches):
        if i % world != rank:
            continue
        x, y = x.to(device), y.to(device)
        with autocast or contextlib.nullcontext():
            loss = model(x, y)
        total += torch.stack([loss.double() * y.numel(), torch.tensor(y.numel(), dtype=torch.float64, device=device)])
    if world > 1:
        dist.all_reduce(total)
    model.train(was_training)
    if total[1] == 0:
        raise ValueError("held-out evaluation got no tokens (no batches)")
    return (total[0] / total[1]).item()



# ----------------------------------------------------------------------------------------------------
# metrics.jsonl: one row per logged step, evaluation and event; exact across resumes

def read_metrics(path: str) -> list[dict]:
    """The rows of a metrics.jsonl. A torn last line (a crash or a full disk mid-append) is dropped with a
    warning naming the file; a bad line elsewhere is an error naming the file and the line."""
    lines = open(path).read().splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n < len(lines):
                raise ValueError(f"{path}: line {n} is not JSON (the file is damaged)") from None
            print(f"warning: {path}: dropped a torn last line ({line[:60]!r})", file=sys.stderr)
    return rows


def start_metrics(out_dir: str, resumed_step: int | None, redo_row: bool = False) -> None:
    """A fresh run starts an empty file (check_out_dir made sure it overwrites no other run's). A resumed
    run keeps the rows up to its checkpoint's step, minus the events and evaluations of that step itself,
    which it redoes, and minus that step's loss row if it closed a log interval early (`redo_row`: the
    resumed run continues that interval): the file ends as an uninterrupted run's would."""
    path = os.path.join(out_dir, "metrics.jsonl")
    rows = read_metrics(path) if resumed_step is not None and os.path.exists(path) else []
    keep = [r for r in rows if r.get("step", 0) < resumed_step or r.get("step") == resumed_step and "loss" in r
            and not redo_row]
    with atomic_write(path) as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)


LOG_SINKS = ("jsonl", "tensorboard", "wandb")


class Sinks:
    """Where rank 0's rows go: metrics.jsonl always (the record the resume logic and the report read), and
    as asked by `log_to`, TensorBoard event files in out_dir/tensorboard and Weights & Biases (run id = the
    out_dir's name, so a resumed run continues its W&B run). Both are optional packages: a missing one is an
    error before step 1, never a silent gap in a long run's curves."""

    def __init__(self, out_dir: str, log_to: list, wandb_project: str = "", config: dict | None = None):
        self.path, self.tb, self.wandb = os.path.join(out_dir, "metrics.jsonl"), None, None
        if "tensorboard" in log_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("config key 'log_to': tensorboard needs the tensorboard package "
                                 "(pip install tensorboard)") from None
            self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
        if "wandb" in log_to:
            try:
                import wandb
            except ImportError:
                raise ValueError("config key 'log_to': wandb needs the wandb package (pip install wandb; "
                                 "WANDB_MODE=offline runs without a network)") from None
            name = os.path.basename(os.path.normpath(out_dir))
            self.wandb = wandb.init(project=wandb_project, name=name, id=re.sub(r"[^\w-]", "-", name),
                                    dir=out_dir, resume="allow", config=config)

    def log(self, row: dict) -> None:
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:  # a full disk: the file and the space, not a bare errno (a torn line is dropped on resume)
            raise OSError(e.errno, f"could not append to {self.path} ({e.strerror or e}; "
                                   f"{disk_free(os.path.dirname(self.path))})") from e
        step = row["step"]
        if "event" in row:  # e.g. the optimizer switch: a marker in both dashboards
            scalars = {f"event/{row['event']}": 1.0}
            if self.tb:
                self.tb.add_text("events", json.dumps(row), step)
        elif "eval_loss" in row:
            scalars = {"eval/loss": row["eval_loss"]}
        else:  # a field of several numbers (fp8_range: x, w, dy) as one scalar each, train/fp8_range/x ...
            flat = {f"{k}/{n}" if isinstance(v, dict) else k: x for k, v in row.items()
                    for n, x in (v.items() if isinstance(v, dict) else [(None, v)])}
            scalars = {f"train/{k}": v for k, v in flat.items() if k != "step" and is_number(v)}
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


class Meter:
    """The logged loss and the throughput of one log interval. The loss is summed on the device (no sync per
    step) and read only when a row is written; a resume continues the interval its checkpoint cut short
    (the checkpoint holds the sum and the count). Checkpoints and evaluations are not training time: the
    loop moves the clock past them (hold)."""

    def __init__(self, tokens: int, loss_sum: torch.Tensor, steps: int, device):
        self.loss, self.n = loss_sum.to(device=device, dtype=torch.float32).clone(), steps
        self.pause(tokens)

    def pause(self, tokens: int) -> None:
        """Start timing afresh from here, `tokens` trained so far."""
        self.t, self.tokens = time.perf_counter(), tokens

    def hold(self, seconds: float) -> None:
        """Leave `seconds` out of the interval's time (a checkpoint, an evaluation), keeping its tokens."""
        self.t += seconds

    def add(self, loss: torch.Tensor) -> None:
        self.loss += loss
        self.n += 1

    def mean_loss(self) -> torch.Tensor:
        """This rank's mean loss over the steps of the interval so far (a device tensor)."""
        return self.loss / self.n

    def tokens_per_s(self, tokens: int) -> float:
        return (tokens - self.tokens) / max(time.perf_counter() - self.t, 1e-9)

    def close_interval(self, tokens: int) -> None:
        self.loss.zero_()
        self.n = 0
        self.pause(tokens)


# ----------------------------------------------------------------------------------------------------
# stopping early: a preemption signal, a wall-clock limit

STOP_TIME, STOP_SIGNAL = 1, 2  # why a run stops early (the larger wins when ranks differ)


def parse_duration(value) -> float:
    """Seconds from a number of seconds or "[D-]HH:MM:SS" (SLURM's --time form); 0 or "" = no limit."""
    if is_number(value):
        if value < 0 or value != value:
            raise ValueError(f"a duration must be >= 0 seconds, got {value!r}")
        return float(value)
    m = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d\d):(\d\d)", str(value).strip())
    if not (m or value == ""):
        raise ValueError(f"a duration is seconds or [D-]HH:MM:SS, got {value!r}")
    d, h, mi, s = (int(g or 0) for g in m.groups()) if m else (0, 0, 0, 0)
    return float(((d * 24 + h) * 60 + mi) * 60 + s)


class Preemption:
    """When to stop early, with a checkpoint, exit status 0. SIGTERM / SIGUSR1 (how SLURM, Kubernetes and
    torchrun announce the end) set a flag, with the time it came; `time_limit_s` (this launch's wall-clock
    budget) stops the run while another step and the final checkpoint still fit. `restore` puts the previous
    signal handlers back.

    Several ranks must stop after the same step, so after every step they vote (`vote`; the largest reason
    wins). Read at once, an all-reduce of a device tensor (nccl's only kind) would make the host wait at every
    step for the whole step's GPU work: the GPU idles while the next step's kernels are queued, and the next
    batch is loaded while nothing runs. So the vote is one integer in host memory, all-reduced over a gloo
    group of its own (`join`), started asynchronously and read after the next step: all ranks stop one step
    later than a single process, which polls alone. Where the host waits for the device anyway (a log row, a
    checkpoint, an evaluation, the last step) the step's own vote is read at once."""

    def __init__(self, time_limit_s: float = 0, margin_s: float = 0):
        self.flag, self.signal, self.signalled_at, self.old = False, None, None, {}
        self.limit, self.margin, self.t0 = time_limit_s, margin_s, time.monotonic()
        self.group, self.pending = None, None  # the ranks' vote: its process group; (tensor, work) in flight
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self.old[sig] = signal.signal(sig, self._set)
            except ValueError:  # not the main thread (e.g. a test harness): no signal handling
                pass

    def _set(self, signum, _frame):
        if not self.flag:
            self.signal, self.signalled_at = signal.Signals(signum).name, time.monotonic()
        self.flag = True

    def poll(self, step_s: float, ckpt_s: float | None, steps: int = 1) -> int:
        """This process's reason: STOP_SIGNAL after a signal; STOP_TIME when `steps` more steps (step_s each)
        and then the final checkpoint (the longer of margin_s and the last checkpoint's ckpt_s) would end past
        time_limit_s; else 0."""
        if self.flag:
            return STOP_SIGNAL
        left = self.limit - (time.monotonic() - self.t0)
        return STOP_TIME if self.limit and left < steps * step_s + max(self.margin, ckpt_s or 0) else 0

    def join(self, world: int, timeout_s: int) -> None:
        """Vote with the other ranks from here on (a gloo group: every rank calls this at the same point)."""
        self.group, self.pending = gloo_group(world, timeout_s), None

    def vote(self, step_s: float, ckpt_s: float | None, settle: bool = False) -> int:
        """The reason every rank stops for after this step, 0 to go on. One process: its own poll. Several:
        this step's vote is started and the previous step's outcome returned; with `settle`, or when that
        outcome is to stop, this step's is waited for and counted too, so none is left in flight. A vote
        acted on a step late looks a step further ahead: two steps and the checkpoint must fit."""
        if self.group is None:
            return self.poll(step_s, ckpt_s)
        mine = torch.tensor([self.poll(step_s, ckpt_s, steps=2)])
        work = dist.all_reduce(mine, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        previous, self.pending = self.pending, (mine, work)
        agreed = self._outcome(previous)
        if settle or agreed:
            agreed, self.pending = max(agreed, self._outcome(self.pending)), None
        return agreed

    @staticmethod
    def _outcome(vote) -> int:
        if vote is None:
            return 0
        t, work = vote
        work.wait()
        return int(t.item())  # host memory: no device sync

    def since_signal(self) -> float:
        return time.monotonic() - self.signalled_at if self.signalled_at else 0.0

    def restore(self):
        for sig, h in self.old.items():
            signal.signal(sig, h)


# ----------------------------------------------------------------------------------------------------
# the report: report.md and the loss plot

def write_report(out_dir: str, wall_s: float | None = None) -> str:
    """out_dir/report.md from what the run left (config.json, metrics.jsonl, loss.png, sample.txt, and a
    downstream probe's probe.json if one was run): the config in brief, the machine, plan vs actual, one row per
    phase, the final held-out loss. Written at the end of every run; `python -m tools.report RUN` redoes it."""
    conf = json.load(open(os.path.join(out_dir, "config.json")))
    t, m, machine = conf["train"], conf["model"], conf.get("machine", {})
    rows = read_metrics(os.path.join(out_dir, "metrics.jsonl"))
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    planned = sum(p["steps"] * p["batch"] * p["seq_len"] for p in t["phases"])
    train_s = sum((b["tokens"] - a["tokens"]) / b["tokens_per_s"] for a, b in zip([{"tokens": 0}] + steps, steps)
                  if b["tokens_per_s"] > 0)
    done = steps[-1]["tokens"] if steps else 0
    lines = [f"# Run report: {out_dir}", "",
             f"- model: {m['n_layer']} layers x {m['hidden']} (FFN {m['ffn_hidden']}, {m['n_head']} heads / "
             f"{m['n_kv_head']} KV), vocab {m['vocab_size']:,}, μP {'on' if m['use_mup'] else 'off'}, "
             f"fp8 {m['fp8']}",
             f"- machine: {machine.get('gpu') or machine.get('cpu', '?')} ({machine.get('device', t['device'])}, "
             f"{machine.get('world_size', 1)} rank(s)), dtype {t['dtype']}, torch {machine.get('torch', '?')}",
             f"- optimizer: AdamW (lr {t['lr']}, emb_lr {t['emb_lr']}), hidden matrices per phase; Muon momentum "
             f"{t['muon_momentum']}, seed {t['seed']}",
             f"- plan vs actual: {done:,} of {planned:,} tokens ({done / max(planned, 1):.0%}), "
             f"{steps[-1]['step'] if steps else 0} of {sum(p['steps'] for p in t['phases'])} steps; training time "
             f"{train_s / 60:.1f} min at {done / max(train_s, 1e-9):,.0f} tokens/s"
             + (f"; wall time of the last session {wall_s / 60:.1f} min" if wall_s else ""),
             "", "| phase | steps | batch x seq | optimizer | last loss | tokens/s | MFU |", "|---|---|---|---|---|---|---|"]
    for p in t["phases"]:
        mine = [r for r in steps if r["phase"] == p["name"]]
        if mine:
            mfu = f"{sum(r['mfu'] for r in mine) / len(mine):.1%}" if "mfu" in mine[-1] else "-"
            lines.append(f"| {p['name']} | {p['steps']} | {p['batch']} x {p['seq_len']} | {mine[-1]['optimizer']} | "
                         f"{mine[-1]['loss']:.4f} | {sum(r['tokens_per_s'] for r in mine) / len(mine):,.0f} | {mfu} |")
    lines += ["", f"Final held-out loss: {evals[-1]['eval_loss']:.4f} (step {evals[-1]['step']})" if evals
              else "No held-out evaluation yet."]
    for name, title in {"probe.json": "Downstream probe", "sample.txt": "Sample"}.items():
        if os.path.exists(os.path.join(out_dir, name)):
            lines += ["", f"## {title}", "", "```", open(os.path.join(out_dir, name)).read().strip(), "```"]
    if os.path.exists(os.path.join(out_dir, "loss.png")):
        lines += ["", "![loss](loss.png)"]
    path = os.path.join(out_dir, "report.md")
    with atomic_write(path) as f:
        f.write("\n".join(lines) + "\n")
    return path


def write_config(out_dir: str, conf: dict, device, world: int, say, verbose: bool = False) -> None:
    """out_dir/config.json: the effective config and the machine it ran on (the report reads it)."""
    path = os.path.join(out_dir, "config.json")
    with atomic_write(path) as f:
        json.dump(dict(conf, machine=machine_info(device, world)), f, indent=1, default=str)
    if verbose:
        say(json.dumps(conf, indent=1, default=str))
    say(f"config: {path}")


def wrap_up(out_dir: str, summary: dict, tokens: int, wall_s: float, say) -> None:
    """The end of a run: the loss plot, report.md, and the closing lines: the numbers, where everything
    is, what to run next."""
    plot = plot_runs({os.path.basename(os.path.normpath(out_dir)): out_dir}, os.path.join(out_dir, "loss.png"))
    ckpt = summary["checkpoint"] or (list_checkpoints(out_dir) or ["(none)"])[-1]
    report = write_report(out_dir, wall_s)
    if summary["evals"]:
        say(f"final held-out loss {summary['evals'][-1][1]:.4f}")
    out = out_dir
    say(f"done: {summary['step']} steps in {wall_s / 60:.1f} min, {tokens:,} tokens trained in total\n"
        f"  checkpoint  {ckpt}\n  metrics     {os.path.join(out, 'metrics.jsonl')}\n"
        f"  loss curve  {plot or 'not drawn: matplotlib is not installed (pip install matplotlib)'}\n"
        f"  config      {os.path.join(out, 'config.json')}\n  report      {report}\n"
        f"next:\n  python -m tools.sample {out} --prompt 'def '\n  python -m tools.export {out} {out}/hf\n"
        f"  python -m tools.eval {out} --task sft\n  python -m tools.plot compare.png A={out} B=OTHER_RUN")


def can_plot() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_runs(runs: dict, path: str, title: str = "", from_tokens: float = 0) -> str | None:
    """Training loss (and held-out loss, as markers) against tokens for {label: out_dir}, saved as a PNG
    next to the metrics it comes from. matplotlib is optional: without it nothing is drawn."""
    if not can_plot():
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, out_dir in runs.items():
        rows = read_metrics(os.path.join(out_dir, "metrics.jsonl"))
        rows = [r for r in rows if r.get("tokens", from_tokens) >= from_tokens]  # zoom: e.g. an ablation's decay
        train_rows = [r for r in rows if "loss" in r]
        line, = ax.plot([r["tokens"] for r in train_rows], [r["loss"] for r in train_rows], label=label, lw=1)
        ev = [r for r in rows if "eval_loss" in r]
        ax.plot([r["tokens"] for r in ev], [r["eval_loss"] for r in ev], "o", color=line.get_color(), ms=4)
        for r in rows:
            if r.get("event") == "optimizer_switch":  # a dotted line where AdamW hands over to Muon
                x = max([t["tokens"] for t in train_rows if t["step"] <= r["step"]], default=0)
                ax.axvline(x, color=line.get_color(), ls=":", lw=0.8)
    ax.set(xlabel="tokens", ylabel="loss (lines: training, dots: held-out)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_write(path, "wb") as f:  # a full disk: no half-drawn loss.png, and an error naming it
            fig.savefig(f, format=os.path.splitext(path)[1][1:] or "png", dpi=110)  # OUT.svg, .pdf as asked
    finally:
        plt.close(fig)
    return path
