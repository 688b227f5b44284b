"""Muon: momentum SGD whose update is orthogonalized by a Newton-Schulz iteration.

The idea
--------
For a weight matrix W (rows x cols) with gradient G, SGD-momentum keeps a buffer M and steps along M.
The momentum matrix of a transformer layer is typically very ill-conditioned: a handful of directions
dominate, so the step mostly amplifies those and barely moves the rest. Muon replaces the step by the
*orthogonal polar factor* of the (Nesterov) momentum: if M = U S V^T is its SVD, the step is U V^T,
which keeps M's singular directions but sets every singular value to 1. All directions then move by the
same amount (the steepest-descent direction under the spectral norm).

Computing U V^T exactly needs an SVD; Muon instead runs a few steps of an odd matrix polynomial that
acts on every singular value separately. Start from X_0 = M / (||M||_F + eps), whose singular values lie
in (0, 1], then iterate

    X_{k+1} = a X_k + b (X_k X_k^T) X_k + c (X_k X_k^T)^2 X_k,   (a, b, c) = (3.4445, -4.7750, 2.0315),

which maps each singular value x to f(x) = a x + b x^3 + c x^5. The coefficients are tuned for speed,
not exactness: f'(0) = a = 3.4445 pulls small singular values up fast, and after 5 steps every singular
value that started above about 2e-3 (relative to ||M||_F) lies in the band [0.68, 1.21]; iterating
further it settles into the oscillation band [0.68, 1.14]. "Roughly orthogonal" is good enough for an
optimizer, and the iteration is only matrix products, so it runs in bf16 on tensor cores. The products
are taken on the wide orientation (rows <= cols, transposing tall matrices) so X X^T is the small
Gram matrix. Each matrix is iterated on its own, but a model has few distinct shapes (4 at 1.3B), so Muon
stacks the matrices of a shape into one batch and runs one chain of batched matrix products per shape
(`Muon._newton_schulz`; the largest shapes cut in two or three to bound the memory): 7 chains per step at
1.3B instead of 192 (or 336 with q, k, v, gate, up apart), fewer, larger kernels for the same arithmetic.

Matching AdamW's update size (the Xmodel-2.5 recipe, after Moonlight / "Muon is Scalable for LLM
Training")
----------------------------------------------------------------------------------------------------
An orthogonal rows x cols matrix has min(rows, cols) unit singular values, so its RMS entry is
1 / sqrt(max(rows, cols)): the raw Muon step shrinks as the matrix grows. Multiplying it by
0.2 * sqrt(max(rows, cols)) gives an update of RMS 0.2, about what AdamW's updates have. Then the
learning rate and the decoupled weight decay tuned for AdamW (and transferred by muP) carry over to
Muon unchanged:

    M  <- momentum * M + G                              (fp32 buffer, whatever the weight dtype)
    U  <- G + momentum * M   (Nesterov)   or   M
    O  <- NewtonSchulz5(U)
    W  <- W * (1 - lr * weight_decay)                   (unscaled lr, as in AdamW)
    W  <- W - lr * 0.2 * sqrt(max(rows, cols)) * O

Fused matrices (the param-group key "splits")
---------------------------------------------
What counts as "one matrix" is a modelling choice. A Megatron model stores q, k and v as one fused
weight (and gate, up as another), so its Muon orthogonalizes [q; k; v] as one matrix, with the factor
0.2 * sqrt(max) of the fused shape; the model here stores them fused as well, so by default each fused
weight is simply one matrix to Muon. The param-group key "splits" (a list of [position, [rows, ...]])
makes each block of rows of a fused weight (q, k and v of [q; k; v]) its own matrix, orthogonalized and
scaled alone, as if it were a separate parameter (muon_fused=False).

The AdamW -> Muon switch (Xmodel-2.5, arXiv 2511.19496)
-------------------------------------------------------
Xmodel-2.5 trains the warmup and stable phases with AdamW and, at the first step of the decay phase,
moves only the 2-D hidden matrices (attention q/k/v/o, MLP gate/up/down) to Muon with a fresh
(zero) momentum; embeddings and norm weights stay on AdamW. Because of the RMS match above, nothing
else changes (LR schedule, clipping, weight decay, data mix). The paper reports +4.58 points on its
13-task average against an AdamW-only decay. `Optimizers` (at the end) is the pair that makes the
switch a replacement of one optimizer; train.py decides when (each phase's "optimizer").

Distributed
-----------
Newton-Schulz is the only expensive part (15 matrix products per matrix and step). Under
torch.distributed, gradients are already averaged (DDP), so every rank would compute the same
orthogonalizations. Instead each rank orthogonalizes a disjoint share of the parameters (a split one with
all its blocks; see `shard_by_shape`) and the bf16 results are all-gathered, one collective per distinct
shape. The momentum update is cheap and elementwise, so every rank keeps the full momentum state and
applies the full update: all ranks hold identical weights, and the result is bit-for-bit the
single-process one.

With `shard_state=True` (ZeRO-1 for Muon, "split by matrix") a rank keeps the fp32 momentum only of
the matrices it owns: it updates that momentum, orthogonalizes it, and the bf16 results are all-gathered as
above, so every rank still applies every update. The arithmetic is the same, so the
weights stay bit-identical to the unsharded run, and the momentum memory per rank drops from
4 B x (hidden weights) to about 1/world of it. Each rank's `state_dict()` then holds only its share:
`full_state_dict(to=0)` gathers the shares into one ordinary (unsharded) state dict on rank 0 for a
checkpoint, and `load_state_dict` of that full dict keeps only the share the rank owns, so a
checkpoint moves freely between sharded, unsharded and other world sizes.
"""

import itertools
import math

import torch
import torch.distributed as dist

NS_COEFFS = (3.4445, -4.7750, 2.0315)
# Muon iterates the matrices of a shape as one batch of at most this many elements (512 MB in bf16): the
# iteration's temporaries are a few times its input, so this bounds the optimizer step's extra memory (at 1.3B
# the 48 [gate; up] matrices of 7680 x 1536 take 3 chains, the 48 MLP-down ones 2, [q; k; v] and o one each)
NS_BATCH_ELEMENTS = 2 ** 28


def zeropower_via_newtonschulz5(G, steps=5, eps=1e-7):
    """Approximate orthogonal polar factor U V^T of G = U S V^T, over the last two dimensions.

    X_0 = bf16(G) / (||G||_F + eps); X_{k+1} = a X + (b A + c A^2) X with A = X X^T, (a, b, c) =
    NS_COEFFS, on the orientation with rows <= cols (tall inputs are transposed and back). Leading
    dimensions are a batch: each matrix is normalized and iterated on its own. Returns bf16, same
    shape as G. Singular values x of X_0 go to f^steps(x), f(x) = a x + b x^3 + c x^5; for steps = 5
    and x >= 2e-3 that is inside [0.68, 1.21]. f(0) = 0, so a zero matrix gives zeros (never NaN) and
    a matrix with ||G||_F << eps comes out scaled by about ||G||_F / eps, i.e. nearly zero.
    """
    if G.ndim < 2:
        raise ValueError(f"zeropower_via_newtonschulz5 needs a matrix (or a batch of them), got shape {tuple(G.shape)}")
    a, b, c = NS_COEFFS
    X = G.bfloat16()
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if tall:
        X = X.mT
    return X


def update_scale(shape, rms_scale=0.2):
    """Factor multiplying lr * NewtonSchulz5(U) for a rows x cols matrix.

    rms_scale = s (the recipe: 0.2): s * sqrt(max(rows, cols)), so the update RMS is s (an orthogonal
    matrix has RMS 1 / sqrt(max(rows, cols))) and AdamW's lr / weight decay carry over.
    rms_scale = None: plain Muon (Keller Jordan's reference), max(1, rows / cols) ** 0.5.
    """
    rows, cols = shape
    if rms_scale is None:
        return max(1.0, rows / cols) ** 0.5
    return rms_scale * math.sqrt(max(rows, cols))


def shard_by_shape(shapes, world_size):
    """Owner rank of each matrix: round-robin over the matrices grouped by shape.

    Matrices are taken shape by shape (shapes in order of first appearance, matrices in list order
    within a shape) and dealt to ranks 0, 1, ..., world_size - 1, 0, ... with one running counter.
    Every rank then owns a near-equal number (difference <= 1) of each shape, which balances the
    Newton-Schulz work, and the owners of one shape can be gathered in one collective. Deterministic
    in the list of shapes, so every rank computes the same partition without talking.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    owners = [0] * len(shapes)
    next_rank = 0
    for idxs in _group_by_shape(shapes).values():
        for i in idxs:
            owners[i] = next_rank
            next_rank = (next_rank + 1) % world_size
    return owners


def _group_by_shape(shapes):
    groups = {}
    for i, shape in enumerate(shapes):
        groups.setdefault(tuple(shape), []).append(i)
    return groups


def newton_schulz_flops(rows, cols, steps=5):
    """Matrix-product FLOPs of zeropower_via_newtonschulz5 on one rows x cols matrix.

    With m = min(rows, cols), n = max(rows, cols), each step does X X^T (2 m^2 n), A A (2 m^3) and
    B X (2 m^2 n): steps * (4 m^2 n + 2 m^3). The elementwise work (O(m n) per step) is left out.
    """
    m, n = min(rows, cols), max(rows, cols)
    return steps * (4 * m * m * n + 2 * m**3)


def _world():
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class Muon(torch.optim.Optimizer):
    """Muon for 2-D hidden matrices (module docstring has the math).

    Per matrix W (a parameter, or a row block of one in group["splits"]) with gradient G, and per parameter
    an fp32 momentum M (state "momentum_buffer"):
        M <- momentum * M + G                                   (the whole parameter)
        U <- G + momentum * M if nesterov else M
        O <- zeropower_via_newtonschulz5(U, ns_steps)
        W <- W * (1 - lr * weight_decay)
        W <- W - lr * update_scale(W.shape, rms_scale) * O
    lr and weight_decay are read from each param group at step time (a schedule may set group["lr"]).
    rms_scale: 0.2 = the recipe's AdamW-RMS match; None = plain Muon scaling max(1, rows/cols)**0.5.
    splits: per group, [position, [rows, ...]] (rows summing to the parameter's): structure, not state, so
    load_state_dict keeps the constructor's, not the file's.
    Only 2-D parameters are accepted: embeddings (2-D, but not hidden), norm weights and biases belong
    on AdamW. Under torch.distributed (world size > 1) every rank must hold the same parameters in the
    same order with gradients already averaged; each orthogonalizes its share and all-gathers.
    shard_state=True: each rank also keeps only its share's momentum (checkpoint with full_state_dict).
    """

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0, rms_scale=0.2,
                 shard_state=False):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        weight_decay=weight_decay, rms_scale=rms_scale, splits=[])
        super().__init__(params, defaults)
        self.shard_state = shard_state  # under torch.distributed: keep momentum only for owned matrices

    def owners(self, world_size):
        """Owner rank of every parameter (param-group order; a split one with all its blocks): shard_by_shape,
        so the partition is fixed for the optimizer's life and the same on every rank."""
        params = [p for g in self.param_groups for p in g["params"]]
        return dict(zip(params, shard_by_shape([p.shape for p in params], world_size)))

    def add_param_group(self, param_group):
        first_index = sum(len(g["params"]) for g in self.param_groups)
        group_index = len(self.param_groups)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for j, p in enumerate(group["params"]):
            if p.ndim != 2:
                raise ValueError(
                    f"Muon: parameter {first_index + j} (param group {group_index}) has shape {tuple(p.shape)}; "
                    "Muon only updates 2-D hidden matrices, keep embeddings, norm weights and biases on AdamW")
        group["splits"] = [[i, list(rows)] for i, rows in group["splits"]]
        _check_splits(group, group_index)
        _check_hyperparameters(group, group_index)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        items = []  # (piece, group), each piece orthogonalized as one matrix
        world_size, rank = _world()
        owners = self.owners(world_size) if world_size > 1 else None
        for group_index, group in enumerate(self.param_groups):
            _check_hyperparameters(group, group_index)
            split_of = dict(group["splits"])
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("Muon does not support sparse gradients")
                # with shard_state, a matrix's owner alone keeps its momentum; the update arrives by all-gather
                if not (self.shard_state and owners is not None and owners[p] != rank):
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32,
                                                                    memory_format=torch.preserve_format)
                    state["momentum_buffer"].mul_(group["momentum"]).add_(p.grad)
                items += [(piece, group) for piece in pieces(p, split_of.get(i))]
        for ((p, lo, hi), group), O in zip(items, self._orthogonalized(items, owners)):
            lr = group["lr"]
            rows = p[lo:hi]  # a view: the whole parameter, or one block of a split one
            rows.mul_(1 - lr * group["weight_decay"])
            rows.sub_(O.float() * (lr * update_scale(rows.shape, group["rms_scale"])))
        return loss

    def _ns_input(self, piece, group):
        p, lo, hi = piece
        buf = self.state[p]["momentum_buffer"][lo:hi]
        return p.grad[lo:hi].float() + group["momentum"] * buf if group["nesterov"] else buf

    def _orthogonalized(self, items, owner_of=None):
        """NewtonSchulz5 of each piece's update direction, batched by shape; under DDP each rank computes only
        its share."""
        world_size, rank = _world()
        shapes = [_shape(piece) for piece, _ in items]
        out = [None] * len(items)
        if world_size == 1:
            for idxs in _group_by_shape(shapes).values():
                for i, o in zip(idxs, self._newton_schulz(items, idxs)):
                    out[i] = o
            return out
        owners = [owner_of[piece[0]] for piece, _ in items]
        pending = []
        for shape, idxs in _group_by_shape(shapes).items():
            owned = [[i for i in idxs if owners[i] == r] for r in range(world_size)]
            slots = max(len(o) for o in owned)
            # Ranks with fewer matrices of this shape send zero padding so all_gather sizes match.
            local = torch.zeros((slots, *shape), dtype=torch.bfloat16, device=items[idxs[0]][0][0].device)
            if owned[rank]:
                local[:len(owned[rank])] = self._newton_schulz(items, owned[rank])
            gathered = [torch.empty_like(local) for _ in range(world_size)]
            pending.append((dist.all_gather(gathered, local, async_op=True), owned, gathered))
        for work, owned, gathered in pending:
            work.wait()
            for r in range(world_size):
                for s, i in enumerate(owned[r]):
                    out[i] = gathered[r][s]
        return out

    def _newton_schulz(self, items, idxs):
        """NewtonSchulz5 of the pieces items[i], i in idxs, all of one shape: their update directions are copied
        into one bf16 batch (the iteration's own first step is that cast) and iterated together, one chain of
        batched matrix products instead of one chain per matrix (336 small chains per step at 1.3B with
        muon_fused=False, 192 with it). Per group's ns_steps, at most NS_BATCH_ELEMENTS elements per chain.
        Returns bf16 [len(idxs), rows, cols]."""
        (piece, _), shape = items[idxs[0]], _shape(items[idxs[0]][0])
        out = torch.empty((len(idxs), *shape), dtype=torch.bfloat16, device=piece[0].device)
        per_chain = max(1, NS_BATCH_ELEMENTS // math.prod(shape))
        by_steps = {}
        for s, i in enumerate(idxs):
            by_steps.setdefault(items[i][1]["ns_steps"], []).append(s)
        for steps, slots in by_steps.items():
            for c in range(0, len(slots), per_chain):
                chunk = slots[c:c + per_chain]
                X = torch.empty((len(chunk), *shape), dtype=torch.bfloat16, device=out.device)
                for k, s in enumerate(chunk):
                    X[k] = self._ns_input(*items[idxs[s]])
                out[chunk] = zeropower_via_newtonschulz5(X, steps)
        return out

    def full_state_dict(self, to=0):
        """The unsharded state dict: on rank `to` with shard_state under torch.distributed, every owner
        sends its momentum buffers there one matrix at a time (None is returned on the other ranks);
        otherwise simply state_dict(). Every rank must call it (it is a collective)."""
        world_size, rank = _world()
        if not (self.shard_state and world_size > 1):
            return self.state_dict()
        sd = self.state_dict()  # this rank's share, keyed by parameter index
        params = [p for g in self.param_groups for p in g["params"]]
        owners = self.owners(world_size)
        have = [None] * world_size  # which indices each rank holds state for (a matrix never stepped has none)
        dist.all_gather_object(have, sorted(sd["state"]))
        for r, indices in enumerate(have):
            for i in indices:
                if owners[params[i]] != r:
                    raise RuntimeError(f"Muon: rank {r} holds momentum of parameter {i}, owned by rank {owners[params[i]]}")
                if r == rank and rank != to:
                    dist.send(sd["state"][i]["momentum_buffer"].contiguous(), dst=to)
                elif rank == to and r != to:
                    buf = torch.empty_like(params[i], dtype=torch.float32)
                    dist.recv(buf, src=r)
                    sd["state"][i] = {"momentum_buffer": buf.cpu()}  # the full set never sits on one GPU
        if rank != to:
            return None
        sd["state"] = dict(sorted(sd["state"].items()))
        return sd

    def load_state_dict(self, state_dict):
        # With shard_state a rank takes only the momentum of the matrices it owns from the (full) dict.
        world_size, rank = _world()
        if self.shard_state and world_size > 1:
            owners = self.owners(world_size)
            saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
            params = [p for g in self.param_groups for p in g["params"]]
            mine = {i for i, p in zip(saved_ids, params) if owners[p] == rank}
            state_dict = dict(state_dict, state={i: s for i, s in state_dict["state"].items() if i in mine})
        # torch.optim casts loaded state to the parameter dtype (bf16 weights -> bf16 momentum);
        # put the saved fp32 buffers back so a resume is exact.
        splits = [g["splits"] for g in self.param_groups]
        super().load_state_dict(state_dict)
        for g, s in zip(self.param_groups, splits):  # what is one matrix: the model's, not the file's
            g["splits"] = s
            g.pop("stacks", None)  # a key files kept when q, k, v were separate parameters
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id, {})
            if "momentum_buffer" in saved:
                self.state[p]["momentum_buffer"] = saved["momentum_buffer"].to(device=p.device, dtype=torch.float32, copy=True)


def pieces(p, rows=None):
    """What of a parameter is orthogonalized as one matrix: all of it, or each block of `rows` (its split) alone.
    A piece is (parameter, first row, end row)."""
    if rows is None:
        return [(p, 0, p.shape[0])]
    ends = list(itertools.accumulate(rows))
    return [(p, end - n, end) for n, end in zip(rows, ends)]


def _shape(piece):
    p, lo, hi = piece
    return (hi - lo, p.shape[1])


def _check_splits(group, group_index):
    where = f"Muon param group {group_index}"
    n, seen = len(group["params"]), set()
    for i, rows in group["splits"]:
        if not (isinstance(i, int) and 0 <= i < n) or i in seen:
            raise ValueError(f"{where}: a split must name a position 0..{n - 1} in the group's params that is in "
                             f"no other split, got {i}")
        seen.add(i)
        if not rows or not all(isinstance(r, int) and r > 0 for r in rows) or sum(rows) != group["params"][i].shape[0]:
            raise ValueError(f"{where}: the row blocks of a split must be positive and add up to the parameter's "
                             f"{group['params'][i].shape[0]} rows, got {rows} for position {i}")


def _check_hyperparameters(group, group_index):
    where = f"Muon param group {group_index}"
    if not group["lr"] >= 0:
        raise ValueError(f"{where}: lr must be >= 0, got {group['lr']}")
    if not 0 <= group["momentum"] < 1:
        raise ValueError(f"{where}: momentum must be in [0, 1), got {group['momentum']}")
    if not (isinstance(group["ns_steps"], int) and group["ns_steps"] >= 1):
        raise ValueError(f"{where}: ns_steps must be an int >= 1, got {group['ns_steps']}")
    if not group["weight_decay"] >= 0:
        raise ValueError(f"{where}: weight_decay must be >= 0, got {group['weight_decay']}")
    if group["rms_scale"] is not None and not group["rms_scale"] > 0:
        raise ValueError(f"{where}: rms_scale must be > 0 (or None for plain Muon scaling), got {group['rms_scale']}")


class Optimizers:
    """The μP parameter groups (mup.param_groups: "hidden" and the rest) on two optimizers: AdamW for the
    embedding and norm weights, always, and for the hidden matrices either AdamW or (from the switch on) Muon.

    Keeping the hidden matrices on their own optimizer makes the switch a replacement of that one
    optimizer: `use("muon")` gives them a fresh Muon (momentum starts at zero) and the embedding/norm
    AdamW, its moments and its step counts are not touched. AdamW updates each parameter independently,
    so two AdamW instances compute exactly what one over all groups would. With `cfg.zero1` under
    torch.distributed each AdamW shards its state across ranks (ZeroRedundancyOptimizer) and Muon keeps
    each matrix's momentum on the one rank that orthogonalizes it (Muon(shard_state=True)); checkpoints
    hold the full, unsharded state (gathered on rank 0), which every rank loads and shards again.
    `cfg`: the hyperparameters, named as in train.TrainConfig (beta1, beta2, adam_eps, weight_decay,
    muon_momentum, muon_ns_steps, muon_rms_scale, zero1)."""

    def __init__(self, groups: list[dict], cfg, kind: str = "adamw"):
        self.cfg, self.groups = cfg, groups
        self.hidden_groups = [g for g in groups if g["name"] == "hidden"]
        self.rest = self._adamw([g for g in groups if g["name"] != "hidden"])
        self.kind, self.hidden = None, None
        self.use(kind)

    def _sharded(self) -> bool:
        return self.cfg.zero1 and _world()[0] > 1

    def _adamw(self, groups):
        # fused: one kernel for all parameters (CPU and CUDA); the foreach path is several times slower on a CPU
        kw = dict(betas=(self.cfg.beta1, self.cfg.beta2), eps=self.cfg.adam_eps, fused=True)
        groups = [dict(g) for g in groups]
        if self._sharded():
            from torch.distributed.optim import ZeroRedundancyOptimizer
            return ZeroRedundancyOptimizer(groups, torch.optim.AdamW, **kw)
        return torch.optim.AdamW(groups, **kw)

    def use(self, kind: str) -> None:
        """Put the hidden matrices on `kind` ("adamw" or "muon") with fresh optimizer state."""
        if kind == self.kind:
            return
        c = self.cfg
        self.hidden = Muon([dict(g) for g in self.hidden_groups], lr=self.hidden_groups[0]["lr"],
                           momentum=c.muon_momentum, nesterov=True, ns_steps=c.muon_ns_steps,
                           weight_decay=c.weight_decay, rms_scale=c.muon_rms_scale, shard_state=self._sharded()) \
            if kind == "muon" else self._adamw(self.hidden_groups)
        self.kind = kind

    def all(self):
        return [self.rest, self.hidden]

    def set_lr(self, factor: float) -> None:
        for opt in self.all():
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * factor

    def step(self) -> None:
        for opt in self.all():
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.all():
            opt.zero_grad(set_to_none=True)

    @staticmethod
    def _state(opt):
        if hasattr(opt, "consolidate_state_dict"):  # ZeRO-1: every rank sends its shard to rank 0
            opt.consolidate_state_dict(0)
            return opt.state_dict() if dist.get_rank() == 0 else None
        if isinstance(opt, Muon):  # with shard_state the same: the momentum shares gathered on rank 0
            return opt.full_state_dict(to=0)
        return opt.state_dict()

    def state_dict(self) -> dict:
        return {"kind": self.kind, "rest": self._state(self.rest), "hidden": self._state(self.hidden)}

    def load_state_dict(self, sd: dict) -> None:
        self.use(sd["kind"])
        for opt, s in ((self.rest, sd["rest"]), (self.hidden, fuse_saved_parts(sd["hidden"], self.hidden_groups))):
            peak = [(g["base_lr"], g["weight_decay"]) for g in opt.param_groups]
            opt.load_state_dict(s)
            for g, (base_lr, wd) in zip(opt.param_groups, peak):  # the config's rates win over the file's
                g["base_lr"], g["weight_decay"] = base_lr, wd


def fuse_saved_parts(saved: dict | None, groups: list[dict]) -> dict | None:
    """An optimizer state dict saved while the fused weights of `groups` (each group's "parts":
    [position, [rows, ...]], mup.param_groups) were still separate parameters, rewritten for the fused ones.
    Both optimizers' state is per element (AdamW's moments, Muon's momentum), so a fused weight's state is
    its parts' concatenated along the rows, exactly what it would have been; a scalar state (AdamW's step)
    is the first part's, all being equal. A dict that already fits the groups is returned as it is."""
    if saved is None or [len(s["params"]) for s in saved["param_groups"]] == [len(g["params"]) for g in groups]:
        return saved
    state, new_groups, next_id = {}, [], 0
    for s, g in zip(saved["param_groups"], groups, strict=True):
        n_parts = {i: len(rows) for i, rows in g.get("parts", [])}
        if len(s["params"]) != sum(n_parts.get(i, 1) for i in range(len(g["params"]))):
            raise ValueError(f"optimizer state: a group of {len(s['params'])} parameters does not fit this model's "
                             f"{len(g['params'])} ({sum(n_parts.values())} when its fused weights are apart)")
        old = iter(s["params"])
        for i in range(len(g["params"])):
            members = [saved["state"].get(next(old)) for _ in range(n_parts.get(i, 1))]
            if any(m is not None for m in members):
                if any(m is None for m in members):
                    raise ValueError("optimizer state: some parts of a fused weight have state and others none")
                state[next_id] = {k: torch.cat([m[k] for m in members]) if torch.is_tensor(v) and v.dim() else v
                                  for k, v in members[0].items()}
            next_id += 1
        new_groups.append({**s, "params": list(range(next_id - len(g["params"]), next_id))})
    return {**saved, "state": state, "param_groups": new_groups}
