"""μP, the maximal-update parameterization: why a 20M proxy's learning rate is right for 1.3B.

Under the standard parameterization (SP), the best learning rate shrinks as a model widens: a wider
hidden layer sums more terms, so the same Adam step moves its output further, and a rate tuned on a
small model blows a large one up. μP (Yang et al., "Tensor Programs V") rescales initialisation,
multipliers and per-layer learning rates by the width multiplier m = hidden / base_width so that every
layer's activations and their per-step updates stay O(1) as m grows. Then the optimum of the base
hyper-parameters no longer moves with width, and Xmodel-2.5 tunes them once on a small proxy (base
width 256) and reuses them for the 1.3B model (m = 6).

The rules for Adam, as Xmodel-2.5 uses them (RECIPE.md):

    piece                 init std            Adam LR           forward multiplier (model.py)
    embedding             init_std (0.1)      emb_lr (0.01)     x input_scale (12)
    hidden matrices       init_std/sqrt(m)    lr / m (0.01/m)   residual branches x 1.4/sqrt(L)
    attn-out, MLP-down    0.1/sqrt(2 L)       lr / m            (the original's; init_out="mup": as hidden)
    output (tied embed.)  -                   -                 logits x output_scale / m
    norm weights          1                   lr / m, no decay  (the original's; norm_lr="embedding": emb_lr)
    attention             -                   -                 softmax scale 1/head_dim

Two rows follow the original (a Megatron fork) rather than μP's textbook, each switchable in ModelConfig:

- Norm gains are "vector-like" parameters (one dimension grows with width, none is summed over), so μP
  proper gives them the width-independent Adam LR, the embedding's (norm_lr="embedding"). Megatron gives
  the decoupled LR only to the embedding and output layer, so the original trains norms at the hidden
  LR, 0.01/6 at 1.3B (norm_lr="hidden", the default). Weight decay is off for them either way.
- The original initialises the two output projections (attention out, MLP down) with
  init_std/sqrt(2 n_layer), 0.0102 at 48 layers, and no width factor (init_out="depth", the default).
  μP wants init_std/sqrt(m) for every hidden matrix (init_out="mup"; 0.041 at 1.3B): a fixed std makes
  a branch's output at init grow like sqrt(width), so strictly it does not transfer. The two agree at
  m = 2 n_layer (width 24,576 for 48 layers); below that the depth init is the smaller one, and after a
  few steps the update term, which μP does keep width-independent, may dominate it. docs/MUP.md "Recipe
  fidelity" has the measurement. With init_out="mup" the depth dependence comes from the residual
  multiplier alone.

The model stores q, k, v as one fused weight and gate, up as another, as the original does (model.py,
`fused_parts`). μP's rules are per matrix, and fusing changes none of them: every part is initialised as
the matrix it stands for (all five are hidden matrices of fan-in `hidden`, so one std), and all are in the
hidden LR group. When the model is on Muon, `param_groups` also says what is orthogonalized as one matrix:
each fused weight whole, as the original (muon_fused=True, the default), or each part alone
(muon_fused=False: the group's "splits").

This module holds those rules (`width_mult`, `init_stds`, `init_weights`, `build_model`, `param_groups`)
and nothing else. The tools that make them visible live in tools/: `python -m tools.coord_check` (every
layer's activation scale stays flat in width under μP and grows under SP), `python -m tools.lr_sweep` (the
best base LR does not move with width) and `python -m tools.search` (the proxy hyper-parameter search whose
winners are copied to the 1.3B config).
"""
import math

import torch
import torch.nn as nn

from model import ModelConfig, Xmodel


def width_mult(cfg: ModelConfig) -> float:
    """m = hidden / base_width under μP; 1 under the standard parameterization (nothing scales)."""
    return cfg.width_mult if cfg.use_mup else 1.0


def init_stds(cfg: ModelConfig) -> dict:
    """The init std of each kind of weight (SP: one width-independent std for all of them).
    "branch_out" is the residual branches' output projections (attention out, MLP down)."""
    hidden = cfg.init_std / math.sqrt(width_mult(cfg))
    branch_out = cfg.init_std / math.sqrt(2 * cfg.n_layer) if cfg.use_mup and cfg.init_out == "depth" else hidden
    return {"embedding": cfg.init_std, "hidden": hidden, "branch_out": branch_out, "output": cfg.init_std}


@torch.no_grad()
def init_weights(model: Xmodel) -> None:
    std = init_stds(model.config)
    nn.init.normal_(model.tok_emb.weight, 0.0, std["embedding"])
    if model.lm_head is not None:
        nn.init.normal_(model.lm_head.weight, 0.0, std["output"])
    branch_out = {id(b.attn.wo.weight) for b in model.blocks} | {id(b.mlp.w_down.weight) for b in model.blocks}
    parts = {id(w): rows for w, rows in model.fused_weights()}
    for name, p in model.blocks.named_parameters():
        if p.dim() == 2:
            # a fused weight part by part: the same draws, in the same order, as when the parts were apart
            for part in p.split(parts.get(id(p), [p.shape[0]])):
                nn.init.normal_(part, 0.0, std["branch_out" if id(p) in branch_out else "hidden"])
        elif "norm" in name:
            nn.init.ones_(p)
    nn.init.ones_(model.norm.weight)


def build_model(cfg: ModelConfig, device="cpu") -> Xmodel:
    """The model with μP (or SP) initialisation; on the meta device nothing is allocated or initialised."""
    with torch.device(device):
        model = Xmodel(cfg)
    if torch.device(device).type != "meta":
        init_weights(model)
    return model


def param_groups(model: Xmodel, lr: float, emb_lr: float, weight_decay: float) -> list[dict]:
    """Optimizer parameter groups with μP learning rates, from base (width base_width) rates.

    Each group carries "name" (hidden / embedding / norm), its peak "lr", "base_lr" (the same value, kept
    for the schedule to scale) and "weight_decay". The "hidden" group is the 2-D block matrices: the ones
    Muon may take over in the decay phase. Its "parts" lists the fused weights as [position in the group's
    params, [rows of each part]] (model.Xmodel.fused_weights): structure, which lets muon.Optimizers read
    optimizer state saved when the parts were separate parameters. Its "splits" (muon.Muon's key: the same
    lists, each part orthogonalized alone) are the parts under muon_fused=False, else empty: Muon then
    orthogonalizes each fused weight whole. Positions rather than tensors, so an AdamW holding the same
    group saves only a few integers with it. The "norm" group's LR is the hidden one (norm_lr="hidden") or
    emb_lr."""
    cfg = model.config
    m = width_mult(cfg)
    hidden, embedding, norm = [], [], []
    for name, p in model.named_parameters():
        if name.startswith("blocks.") and p.dim() == 2:
            hidden.append(p)
        elif p.dim() == 2:
            embedding.append(p)  # the token embedding, and lm_head when untied
        else:
            norm.append(p)
    position = {id(p): i for i, p in enumerate(hidden)}
    parts = [[position[id(w)], rows] for w, rows in model.fused_weights()]
    splits = [] if cfg.muon_fused else [[i, list(rows)] for i, rows in parts]
    groups = [dict(name="hidden", params=hidden, lr=lr / m, weight_decay=weight_decay, parts=parts, splits=splits),
              dict(name="embedding", params=embedding, lr=emb_lr, weight_decay=weight_decay),
              dict(name="norm", params=norm, lr=lr / m if cfg.norm_lr == "hidden" else emb_lr, weight_decay=0.0)]
    for g in groups:
        g["base_lr"] = g["lr"]
    return [g for g in groups if g["params"]]
