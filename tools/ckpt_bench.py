"""How long a checkpoint stops training: the single file rank 0 wrote before (every rank waiting for it)
against the checkpoint directory every rank writes its share of, in the background (runtime.Checkpointer).

    python -m tools.ckpt_bench [--ranks 1 2 4] [--hidden 512] [--layers 8] [--zero1] [--out DIR]

For each number of ranks, that many CPU processes (gloo) build the same model (by default about 90M
parameters: the full 129,280-token vocabulary at width 512, 8 blocks) with AdamW state (one step on random
gradients), then each writes a checkpoint `--repeat` times in both ways:

- single file: `Optimizers.state_dict()` (with --zero1, the shards gathered on rank 0), then rank 0's
  runtime.save_checkpoint (torch.save through a sha256, fsync, rename) while the other ranks wait at a
  barrier. Every rank is blocked from the start to the barrier: that is the whole write.
- directory: runtime.checkpoint_parts, then Checkpointer.save (what training waits for: the copy of this
  rank's share to CPU memory) and Checkpointer.wait (the rest: DCP's write, checksums, rank 0's manifest and
  rename, in the background while training goes on).

Per rank and number of ranks it prints the median seconds (blocked, and complete for the directory) and the
checkpoint's size, and writes them with the machine (CPU model, cores, torch) to OUT/ckpt_bench.json. The
ranks share the CPU cores and the disk of one machine: on one 2-core machine 4 ranks compete for both.
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mup
import runtime
import tools
import train
from model import ModelConfig
from muon import Optimizers


def build(hidden: int, layers: int, zero1: bool):
    """The model and its optimizers with AdamW state (one step on seeded random gradients), as train.py
    builds them (the hyperparameters are TrainConfig's defaults)."""
    mcfg = ModelConfig(n_layer=layers, hidden=hidden, ffn_hidden=hidden * 5 // 2, n_head=max(1, hidden // 64),
                       n_kv_head=1, base_width=256)
    cfg = train.TrainConfig(zero1=zero1)
    torch.manual_seed(0)
    model = mup.build_model(mcfg)
    opts = Optimizers(mup.param_groups(model, cfg.lr, cfg.emb_lr, cfg.weight_decay), cfg)
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    opts.step()
    opts.zero_grad()
    return model, opts


def single_file(out_dir: str, step: int, model, opts, rank: int, world: int) -> float:
    """Seconds this rank was blocked by the single-file checkpoint (rank 0 writing, the others waiting)."""
    t0 = time.perf_counter()
    state = {"model": model.state_dict(), "optim": opts.state_dict(), "tokens": 0}
    if rank == 0:
        runtime.save_checkpoint(out_dir, step, state, keep=1)
    if world > 1:
        dist.barrier()
    return time.perf_counter() - t0


def directory(ck: runtime.Checkpointer, step: int, model, opts, world: int) -> tuple[float, float]:
    """(seconds training waited, seconds until complete) for a checkpoint directory of this rank's share."""
    t0 = time.perf_counter()
    optim, replicated, owned = runtime.checkpoint_parts(model, {"rest": opts.rest, "hidden": opts.hidden}, world)
    blocked = time.perf_counter() - t0 + ck.save(step, {"optim": optim, "tokens": 0}, replicated, owned)
    ck.wait()
    return blocked, time.perf_counter() - t0


def worker(rank: int, world: int, init_file: str, args, out_dir: str, results: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=1800))
    model, opts = build(args.hidden, args.layers, args.zero1)
    ck = runtime.Checkpointer(os.path.join(out_dir, "dir"), keep=1, rank=rank, world=world)
    rows = []
    for i in range(args.repeat):
        single = single_file(os.path.join(out_dir, "file"), i + 1, model, opts, rank, world)
        blocked, total = directory(ck, i + 1, model, opts, world)
        rows.append({"single_file_s": single, "dir_blocking_s": blocked, "dir_total_s": total})
    params = sum(p.numel() for p in model.parameters())
    with open(os.path.join(results, f"{world}_{rank}.json"), "w") as f:
        json.dump({"rows": rows, "params": params}, f)
    if world > 1:
        dist.barrier()
        runtime.exit_distributed()


def size_gb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(path) for n in names) / 1e9


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.date.today().isoformat()}


def measure(world: int, args, scratch: str) -> dict:
    out_dir, results = os.path.join(scratch, f"w{world}"), os.path.join(scratch, f"r{world}")
    os.makedirs(results)
    mp.start_processes(worker, args=(world, os.path.join(scratch, f"rdzv{world}"), args, out_dir, results),
                       nprocs=world, join=True, start_method="spawn")
    per_rank = [json.load(open(os.path.join(results, f"{world}_{r}.json"))) for r in range(world)]
    med = lambda rows, k: statistics.median(x[k] for x in rows)  # noqa: E731
    out = {"ranks": world, "params": per_rank[0]["params"],
           "single_file_gb": size_gb(os.path.join(out_dir, "file")), "dir_gb": size_gb(os.path.join(out_dir, "dir")),
           "per_rank": [{k: med(p["rows"], k) for k in ("single_file_s", "dir_blocking_s", "dir_total_s")}
                        for p in per_rank]}
    shutil.rmtree(out_dir)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tools.ckpt_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=tools.positive_int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--hidden", type=tools.positive_int, default=512)
    ap.add_argument("--layers", type=tools.positive_int, default=8)
    ap.add_argument("--zero1", action="store_true", help="ZeRO-1: AdamW state sharded across the ranks")
    ap.add_argument("--repeat", type=tools.positive_int, default=3, help="checkpoints per way (the median is shown)")
    ap.add_argument("--out", default=None, help="where ckpt_bench.json goes (default: print only)")
    ap.add_argument("--scratch", default=None, help="where the checkpoints are written (default: a temporary dir)")
    args = ap.parse_args(argv)
    report = {"machine": machine(), "hidden": args.hidden, "layers": args.layers, "zero1": args.zero1, "runs": []}
    print(f"{report['machine']['cpu']}, {report['machine']['cores']} cores, torch {torch.__version__}")
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        for world in args.ranks:
            r = measure(world, args, scratch)
            report["runs"].append(r)
            print(f"{world} rank(s), {r['params'] / 1e6:.1f}M parameters: single file {r['single_file_gb']:.2f} GB, "
                  f"directory {r['dir_gb']:.2f} GB")
            for rank, p in enumerate(r["per_rank"]):
                print(f"  rank {rank}: single file blocks {p['single_file_s']:6.2f} s | directory blocks "
                      f"{p['dir_blocking_s']:5.2f} s, complete after {p['dir_total_s']:6.2f} s", flush=True)
    if args.out:
        with runtime.atomic_write(os.path.join(args.out, "ckpt_bench.json")) as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    tools.run(main)
