"""What the μP tools share: small proxy models, their data, a short training run, and plotting.

The coordinate check, the LR-transfer sweep and the proxy search (tools/coord_check.py, lr_sweep.py,
search.py) all train small members of the recipe's proxy family (RECIPE.md: heads = hidden/head_dim, one
K/V head, FFN = 2.5 x hidden) for a few steps with AdamW on `mup.param_groups` at a constant learning
rate, as the paper's sweeps did. Only the width changes between the members of a sweep; everything that
is a finite dimension under μP (depth, head size, vocabulary, sequence length, batch) stays fixed.
"""
import io
import json
import math
import sys
from pathlib import Path

import torch

import data
import mup
import runtime
from model import ModelConfig, Xmodel

PARAMETERIZATIONS = ("mup", "sp")
BPE_VOCAB = 2048
SPECIAL_EOS = "<|endoftext|>"


def add_machine_options(ap, dtype_help: str = "") -> None:
    """--device/--dtype, resolved by runtime.resolve_machine (auto: CUDA, else MPS, else CPU; bf16 where native)."""
    ap.add_argument("--device", default="auto", choices=runtime.DEVICES, help="auto: CUDA, else MPS, else CPU")
    ap.add_argument("--dtype", default="auto", choices=runtime.DTYPES,
                    help="auto: bfloat16 autocast where the device runs it natively, else float32" + dtype_help)


def add_variant_options(ap, stem: str) -> None:
    """--set KEY=VALUE (ModelConfig fields for every model of the run) and --tag (a suffix for the file names)."""
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="ModelConfig fields for every model, e.g. init_out=mup norm_lr=embedding (μP-pure)")
    ap.add_argument("--tag", default="", help=f"suffix of the output names: OUT/{stem}_TAG.json and .png")


def proxy_config(width: int, n_layer: int, vocab_size: int, use_mup: bool = True, head_dim: int = 64,
                 **overrides) -> ModelConfig:
    """A member of the recipe's proxy family: n_head = width/head_dim, one K/V head, FFN = 2.5 x width.

    Everything else (base width 256, the multipliers, init std) is ModelConfig's default unless
    overridden; use_mup=False gives the standard parameterization of the same shape."""
    if width % head_dim:
        raise ValueError(f"width {width} is not a multiple of head_dim {head_dim}")
    kw = dict(vocab_size=vocab_size, n_layer=n_layer, hidden=width, ffn_hidden=int(2.5 * width),
              n_head=width // head_dim, n_kv_head=1, max_seq_len=4096, use_mup=use_mup, loss_chunk=4096)
    kw.update(overrides)
    return ModelConfig(**kw)


def make_optimizer(model: Xmodel, lr: float, emb_lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW (betas 0.9/0.95, eps 1e-8, the recipe's) on the μP parameter groups of `param_groups`."""
    return torch.optim.AdamW(mup.param_groups(model, lr, emb_lr, weight_decay), betas=(0.9, 0.95), eps=1e-8)


def markov_tokens(vocab_size: int, n_seq: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """[n_seq, seq_len + 1] token ids from a fixed random Markov chain (something learnable, no corpus).

    Each token has 4 possible successors, taken with probabilities 0.5/0.25/0.15/0.1; the chain's table
    and the first tokens come from `seed`."""
    g = torch.Generator().manual_seed(seed)
    succ = torch.randint(vocab_size, (vocab_size, 4), generator=g)
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    out = torch.empty(n_seq, seq_len + 1, dtype=torch.long)
    out[:, 0] = torch.randint(vocab_size, (n_seq,), generator=g)
    for t in range(seq_len):
        k = torch.multinomial(probs.expand(n_seq, 4), 1, generator=g).squeeze(1)
        out[:, t + 1] = succ[out[:, t], k]
    return out


# ---------------------------------------------------------------------------------------------------
# the embedded corpus with a small vocabulary

def small_bpe(vocab_size: int = BPE_VOCAB, cache_dir=None, texts=None) -> str:
    """Path of a byte-level BPE tokenizer.json with vocab_size ids (EOS included), trained once on
    `texts` (default: the embedded stdlib corpus, both domains) and cached.

    Why: under μP the vocabulary is a finite dimension, and a 129k-row softmax would dominate the cost
    of 64-512 wide models on a CPU. A BPE of the same corpus keeps the task (next-token prediction on
    code and prose) while making the output layer small. The tokenizer sees all documents, held-out
    ones included; that touches only the segmentation, not the loss."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 300:
        raise ValueError(f"BPE vocab_size {vocab_size} is too small: it needs the 256 bytes + EOS + merges")
    base = Path(cache_dir).expanduser() if cache_dir is not None else data.default_cache_dir()
    path = base / f"mup-bpe{vocab_size}-py{sys.version_info.major}{sys.version_info.minor}" / "tokenizer.json"
    if texts is None and path.is_file():
        return str(path)
    if texts is None:
        docs = data.default_corpus_documents()
        texts = [t for domain in docs.values() for _, t in domain]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL_EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    with runtime.atomic_write(path) as f:
        f.write(tok.to_str())
    return str(path)


def proxy_dataset(dataset: str | None = None, cache_dir=None) -> str:
    """`dataset` if given, else the embedded corpus tokenized with the cached small BPE (prepared once)."""
    if dataset is not None:
        return str(dataset)
    return data.default_corpus(cache_dir, tokenizer=small_bpe(cache_dir=cache_dir), progress=False)


def equal_mixture(dataset: str, seed: int = 0) -> data.Mixture:
    """All sources of a prepared dataset, equally weighted (the embedded corpus: code/prose 50/50; its "sft"
    source belongs to the decay mix, not to the pretraining text these tools train on)."""
    m = data.read_manifest(dataset)
    sources = [s for s in m["sources"] if not ("default_corpus" in m and s == "sft")]
    return data.Mixture(dataset, {s: 1.0 / len(sources) for s in sources}, seed=seed)


def corpus_mixture(tokenizer: str | None = None, cache_dir=None, dataset: str | None = None, seed: int = 0):
    """(Mixture over "code"/"prose" 50/50, n_vocab) for the embedded corpus tokenized with `tokenizer`
    (default: the cached small BPE), or for an already prepared `dataset` directory."""
    if dataset is None and tokenizer is not None:
        dataset = data.default_corpus(cache_dir, tokenizer=tokenizer, progress=False)
    mix = equal_mixture(proxy_dataset(dataset, cache_dir), seed)
    return mix, int(mix.tokenizer_identity["n_vocab"])


# ---------------------------------------------------------------------------------------------------
# a short proxy training

def train_proxy(cfg: ModelConfig, lr: float, emb_lr: float, mix, steps: int, batch: int, seq_len: int,
                eval_batches, weight_decay: float = 0.0, seed: int = 0, device: str = "cpu",
                dtype: str = "float32") -> dict:
    """Train a freshly built μP/SP model for `steps` AdamW steps at a constant LR; held-out loss at the end.

    The batches are the mixture's (a pure function of the step), the init is seeded, so two runs that
    differ only in lr see the same data and start from the same weights. A non-finite training loss
    stops the run and reports loss = inf (diverged)."""
    torch.manual_seed(seed)
    model = mup.build_model(cfg, device)
    opt = make_optimizer(model, lr, emb_lr, weight_decay)
    losses, mix = [], mix.schedule([{"steps": steps, "batch": batch, "seq_len": seq_len}])
    for step in range(steps):
        x, y = mix.batch(step, 0, 0, 1, batch, seq_len)
        with runtime.autocast(device, dtype):
            loss = model(x.to(device), y.to(device))
        if not torch.isfinite(loss):
            return dict(loss=float("inf"), train=losses, diverged=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    loss = runtime.heldout_loss(model, eval_batches, device, runtime.autocast(device, dtype))
    return dict(loss=loss if math.isfinite(loss) else float("inf"), train=losses, diverged=not math.isfinite(loss))


# ---------------------------------------------------------------------------------------------------
# output: JSON always, plots when matplotlib is installed

def write_json(path, obj) -> None:
    with runtime.atomic_write(path) as f:
        f.write(json.dumps(obj, indent=1))


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed (it is optional)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_png(fig, path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72)
    with runtime.atomic_write(path, "wb") as f:
        f.write(buf.getvalue())


def report_written(say, json_path, png_path, plotted: bool) -> None:
    if plotted:
        say(f"wrote {json_path} and {png_path}")
    else:
        say(f"wrote {json_path}; the plot needs matplotlib (pip install matplotlib)")
