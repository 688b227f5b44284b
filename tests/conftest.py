"""Shared fixtures: a small real dataset (two sources from the standard library) and a tiny run config; HostReads,
where a run's host reads device values."""
import sysconfig
import threading
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

import data
from tools.proxy import small_bpe

# The trainer tests are about the trainer, not the tokenizer: a 512-id byte-level BPE of the same text keeps
# the task (next-token prediction on code and prose) while the model stops being 99% embedding (DeepSeek's
# 129,280 x 32 rows: 50 MB checkpoints of a 2 x 32 model). The DeepSeek-V3 tokenizer keeps its own tests
# (test_data.py, test_export.py) and the first command (test_first_command.py) trains with it.
TINY_VOCAB = 512


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_thread")`): their
    tensors are tiny, so more threads only add OpenMP barriers, which cost seconds per step on a busy 2-core
    machine (a tiny training run: 15 s with 2 threads, 5 s with 1); and runs compared bit for bit sum in the
    same order as a subprocess with OMP_NUM_THREADS=1. Restored afterwards for the other modules."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A prepared dataset with sources "code" (stdlib .py files) and "prose" (pydoc topics), tokenized with a
    512-id BPE trained on the same text (its manifest names the tokenizer: write_config reads it)."""
    root = tmp_path_factory.mktemp("tiny_data")
    lib = Path(sysconfig.get_paths()["stdlib"])
    code = sorted(p for p in lib.glob("*.py") if 8_000 < p.stat().st_size < 30_000)[:24]
    from pydoc_data.topics import topics
    prose_dir = root / "prose"
    prose_dir.mkdir()
    for i, (name, text) in enumerate(sorted(topics.items())[:60]):
        (prose_dir / f"{i:03d}.txt").write_text(text)
    texts = [p.read_text() for p in code] + [p.read_text() for p in sorted(prose_dir.iterdir())]
    tok = small_bpe(TINY_VOCAB, cache_dir=root, texts=texts)
    return data.prepare({"code": [str(p) for p in code], "prose": str(prose_dir)}, root / "ds", tokenizer=tok,
                        heldout_frac=0.25, workers=1, progress=False)


def write_config(path, data_dir, **overrides) -> str:
    """A tiny model (2 x 32) and a 4-phase curriculum with a sequence stretch and the Muon switch. A prepared
    `data_dir` (tiny_data) also sets the run's tokenizer and vocabulary to the dataset's."""
    cfg = dict(
        n_layer=2, hidden=32, ffn_hidden=80, n_head=2, n_kv_head=1, base_width=16, loss_chunk=64,
        lr=0.05, emb_lr=0.05, device="cpu", dtype="float32", micro_batch=2, log_interval=1, eval_interval=0, eval_windows=4,
        eval_batch=2, sample_tokens=4, data={"code": str(data_dir), "prose": str(data_dir)},
        mixtures={"stable": {"code": 0.5, "prose": 0.5}, "decay": {"code": 0.3, "prose": 0.7}},
        phases=[
            dict(name="warmup", steps=2, lr=("linear", 0.0, 1.0), batch=4, seq_len=32, mix="stable", optimizer="adamw"),
            dict(name="stable", steps=3, lr=("constant", 1.0, 1.0), batch=4, seq_len=32, mix="stable", optimizer="adamw"),
            dict(name="decay", steps=3, lr=("exp", 1.0, 1 / 16), batch=4, seq_len=32, mix="decay", optimizer="muon"),
            dict(name="long", steps=2, lr=("linear", 1 / 16, 0.01), batch=2, seq_len=64, mix="decay", optimizer="muon"),
        ],
    )
    if data_dir is not None and (Path(data_dir) / "manifest.json").is_file():
        tok = data.read_manifest(data_dir)["tokenizer"]
        cfg.update(tokenizer=tok["spec"], vocab_size=tok["n_vocab"])
    cfg.update(overrides)
    with open(path, "w") as f:
        f.writelines(f"{k} = {v!r}\n" for k, v in cfg.items())
    return str(path)



class HostReads(TorchDispatchMode):
    """Where a training run's host reads values of the device, per step: every op that would make the host
    wait for the GPU's queued work there. A CPU has no such wait to see, so what is recorded is the read
    itself: the ops aten tags data_dependent_output (.item(), bool(), int(), float(), torch.equal, ...) or
    dynamic_output_shape (nonzero, masked_select, boolean indexing; integer indexing is none: its shape is
    its indices'), and tolist / numpy, which read a CPU tensor without an aten op. A read of a tensor
    all-reduced asynchronously over a gloo group (host memory on any machine: the ranks' stop vote) is
    recorded as "gloo".

    `with HostReads() as reads: train.train(argv)`; then reads.steps[k] lists the reads from train_step of
    step k (0-based) to the next one: the step's own work, then what the loop does after it (a log row, a
    checkpoint, the vote). Only this thread's reads count (a checkpoint's background write is not the loop)."""

    INTEGER_INDEXABLE = (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default,
                         torch.ops.aten.index_put_.default)

    def __init__(self):
        super().__init__()
        self.thread, self.steps, self.current, self.gloo = threading.get_ident(), {}, None, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        integer_index = func in self.INTEGER_INDEXABLE and all(
            i is None or i.dtype not in (torch.bool, torch.uint8) for i in args[1])
        if torch.Tag.data_dependent_output in func.tags or (
                torch.Tag.dynamic_output_shape in func.tags and not integer_index):
            self._read(str(func), args[0] if args and isinstance(args[0], torch.Tensor) else None)
        return func(*args, **(kwargs or {}))

    def _read(self, what: str, tensor) -> None:
        if self.current is None or threading.get_ident() != self.thread:
            return
        for t in (tensor, getattr(tensor, "_base", None)):
            ref = self.gloo.get(id(t))
            if t is not None and ref is not None and ref() is t:
                what = "gloo"
        self.steps[self.current].append(what)

    def _train_step(self, r, params, phase, step, *a, **k):
        self.current = step
        self.steps[step] = []
        return self.real["train_step"](r, params, phase, step, *a, **k)

    def _all_reduce(self, tensor, *a, **k):
        group = k.get("group", a[1] if len(a) > 1 else None)
        if k.get("async_op") and group is not None and dist.get_backend(group) == "gloo":
            self.gloo[id(tensor)] = weakref.ref(tensor)
        return self.real["all_reduce"](tensor, *a, **k)

    def _reader(self, name: str):
        real = getattr(torch.Tensor, name)

        def read(t, *a, **k):
            self._read(f"Tensor.{name}", t)
            return real(t, *a, **k)
        return read

    def __enter__(self):
        import train
        self.real = {"train_step": train.train_step, "all_reduce": dist.all_reduce}
        self.own = {name: torch.Tensor.__dict__.get(name) for name in ("tolist", "numpy")}
        train.train_step, dist.all_reduce = self._train_step, self._all_reduce
        for name in self.own:
            setattr(torch.Tensor, name, self._reader(name))
        return super().__enter__()

    def __exit__(self, *exc):
        import train
        train.train_step, dist.all_reduce = self.real["train_step"], self.real["all_reduce"]
        for name, own in self.own.items():
            if own is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, own)
        return super().__exit__(*exc)
