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
    output (tied embed.)  -                   -                 logits x output_scale / m
    norm weights          1                   emb_lr, no decay  -
    attention             -                   -                 softmax scale 1/head_dim

Norm gains are "vector-like" parameters (one dimension grows with width, none is summed over), so μP
gives them the width-independent Adam LR, the same as the embedding; weight decay is off for them as in
the recipe. The public Megatron scripts initialise the two output projections (attention out, MLP down)
with 0.1/sqrt(2 * n_layer) and no width factor; that is not μP-consistent (it would not transfer), so
here every hidden matrix, output projections included, uses init_std/sqrt(m) and the depth dependence
comes from the residual multiplier alone.

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
    """The init std of each kind of weight (SP: one width-independent std for all of them)."""
    return {"embedding": cfg.init_std, "hidden": cfg.init_std / math.sqrt(width_mult(cfg)),
            "output": cfg.init_std}


@torch.no_grad()
def init_weights(model: Xmodel) -> None:
    std = init_stds(model.config)
    nn.init.normal_(model.tok_emb.weight, 0.0, std["embedding"])
    if model.lm_head is not None:
        nn.init.normal_(model.lm_head.weight, 0.0, std["output"])
    for name, p in model.blocks.named_parameters():
        if p.dim() == 2:
            nn.init.normal_(p, 0.0, std["hidden"])
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
    Muon may take over in the decay phase."""
    m = width_mult(model.config)
    hidden, embedding, norm = [], [], []
    for name, p in model.named_parameters():
        if name.startswith("blocks.") and p.dim() == 2:
            hidden.append(p)
        elif p.dim() == 2:
            embedding.append(p)  # the token embedding, and lm_head when untied
        else:
            norm.append(p)
    groups = [dict(name="hidden", params=hidden, lr=lr / m, weight_decay=weight_decay),
              dict(name="embedding", params=embedding, lr=emb_lr, weight_decay=weight_decay),
              dict(name="norm", params=norm, lr=emb_lr, weight_decay=0.0)]
    for g in groups:
        g["base_lr"] = g["lr"]
    return [g for g in groups if g["params"]]
