"""Checkpoint directories (runtime.Checkpointer, torch.distributed.checkpoint): the layout and its manifest,
completion by rename, keep-K, a checksum per file verified in shares, a crafted index refused, single files
(older runs) beside directories, and the conversion to one file for the tools.

One process here (the Checkpointer's 1-rank path, which is DCP's with no process group); the multi-rank
writes, the resharding and ZeRO-1's shards are tests/test_distributed.py's, the preemption paths
tests/test_faults.py's.
"""
import json
import os
import pickle
import re
import shutil

import pytest
import torch

import runtime
import train
from conftest import write_config

pytestmark = pytest.mark.usefixtures("one_thread")


def state(seed: float) -> tuple[dict, dict]:
    """(meta, replicated tensors) of a small checkpoint: a weight, an optimizer moment, a bf16 buffer."""
    meta = {"tokens": 1000, "optim": {"kind": "adamw", "rest": {"param_groups": [{"lr": 0.1, "params": [0]}]}}}
    tensors = {"model/w": torch.full((64, 32), seed), "model/b": torch.arange(5, dtype=torch.bfloat16),
               "optim/rest/state/0/exp_avg": torch.full((64, 32), -seed)}
    return meta, tensors


def save(ck: runtime.Checkpointer, step: int) -> str:
    meta, tensors = state(float(step))
    ck.save(step, meta, tensors, {})
    return ck.wait()


def test_a_checkpoint_directory_reads_back_in_the_nested_layout_and_is_pruned(tmp_path):
    ck = runtime.Checkpointer(str(tmp_path), keep=2)
    paths = [save(ck, s) for s in (1, 2, 3)]
    assert [os.path.basename(p) for p in paths] == ["ckpt_00000001", "ckpt_00000002", "ckpt_00000003"]
    assert runtime.list_checkpoints(str(tmp_path)) == paths[1:]  # keep=2
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]
    manifest = json.load(open(os.path.join(paths[-1], "manifest.json")))
    assert manifest["step"] == 3 and set(manifest["files"]) == {"__0_0.distcp", ".metadata", "meta.pt"}
    got = runtime.load_checkpoint(str(tmp_path))  # the run directory's latest, verified
    assert got["step"] == 3 and got["tokens"] == 1000 and got["format"] == runtime.CKPT_FORMAT
    assert torch.equal(got["model"]["w"], torch.full((64, 32), 3.0)) and got["model"]["b"].dtype == torch.bfloat16
    assert torch.equal(got["optim"]["rest"]["state"][0]["exp_avg"], torch.full((64, 32), -3.0))  # index back to int
    assert got["optim"]["rest"]["param_groups"] == [{"lr": 0.1, "params": [0]}]
    only = runtime.read_checkpoint(paths[-1], want=lambda meta: lambda key: key.startswith("model/"))
    assert set(only["model"]) == {"w", "b"} and "state" not in only["optim"]["rest"]
    assert [t[0] for t in ck.timings] == [1, 2, 3] and all(0 <= w <= total for _, w, total in ck.timings)
    for name in ("meta.pt", "__0_0.distcp", "manifest.json"):  # a file of it (meta.pt alone has no weights)
        part = os.path.join(paths[-1], name)
        with pytest.raises(ValueError, match=f"{part} is one file of the checkpoint directory {paths[-1]}: give"):
            runtime.load_checkpoint(part)
        assert runtime.read_start(part, 0, 1, lambda meta: None) == (None, f"{part} is one file of the checkpoint "
                                                                     f"directory {paths[-1]}: give the directory "
                                                                     f"(or its run's)")



def test_ctrl_c_while_reading_is_an_interruption_not_a_damaged_checkpoint(tmp_path, monkeypatch, capsys):
    """DCP gathers a KeyboardInterrupt raised while it reads as a rank's failure: it is raised again as the
    interruption it is (the checkpoint is fine), and a tool ends on it in one line, exit status 130."""
    import tools
    from torch.distributed.checkpoint.api import CheckpointException
    path = save(runtime.Checkpointer(str(tmp_path), keep=1), 1)

    def interrupted(*args, **kwargs):
        raise CheckpointException("load failed", {0: (KeyboardInterrupt(), None)})
    monkeypatch.setattr(runtime, "_read_tensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        runtime.read_checkpoint(path)
    with pytest.raises(SystemExit) as e:
        tools.run(lambda: runtime.load_checkpoint(path))
    assert e.value.code == 130 and capsys.readouterr().err == "interrupted (SIGINT): stopped\n"

def test_a_directory_is_listed_only_once_complete(tmp_path):
    ck = runtime.Checkpointer(str(tmp_path), keep=5)
    first = save(ck, 1)
    shutil.copytree(first, tmp_path / ".ckpt_00000002.tmp-dcp")  # a write still going on (or killed)
    half = tmp_path / "ckpt_00000003"                              # renamed, but without its manifest
    shutil.copytree(first, half)
    os.remove(half / "manifest.json")
    assert runtime.list_checkpoints(str(tmp_path)) == [first]
    lock = runtime.RunLock(str(tmp_path))  # the next run's start removes what a killed run left half-written
    lock.release()
    assert not (tmp_path / ".ckpt_00000002.tmp-dcp").exists()


def test_a_hugging_face_folder_given_as_a_checkpoint_names_the_import(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=f"a Hugging Face folder: make it one with python -m tools.export "
                                                f"--import {tmp_path} OUT_DIR"):
        runtime.load_checkpoint(str(tmp_path))


def test_a_checkpoint_pruned_halfway_is_unlisted_and_cleared_by_the_next_run(tmp_path, monkeypatch):
    """A kill while keep-K removes an old checkpoint: nothing half-removed is listed, and the next start clears it."""
    ck = runtime.Checkpointer(str(tmp_path), keep=5)
    save(ck, 1)
    second = save(ck, 2)

    def killed(path, *a, **k):
        if not k.get("ignore_errors"):
            raise KeyboardInterrupt  # the removal stops partway (its first file gone)
    monkeypatch.setattr(runtime.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        runtime.prune_checkpoints(str(tmp_path), 1)
    monkeypatch.undo()
    assert runtime.list_checkpoints(str(tmp_path)) == [second]
    assert sorted(os.listdir(tmp_path)) == [".ckpt_00000001.tmp-prune", "ckpt_00000002"]
    runtime.RunLock(str(tmp_path)).release()
    assert sorted(os.listdir(tmp_path)) == [".lock", "ckpt_00000002"]


def test_flipped_bytes_are_found_by_the_rank_whose_share_holds_the_file(tmp_path):
    ck = runtime.Checkpointer(str(tmp_path), keep=5)
    first, second = save(ck, 1), save(ck, 2)
    data = os.path.join(second, "__0_0.distcp")
    raw = bytearray(open(data, "rb").read())
    raw[len(raw) // 2] ^= 0x10
    open(data, "wb").write(raw)
    files = sorted(json.load(open(os.path.join(second, "manifest.json")))["files"])
    share = files.index("__0_0.distcp") % 2  # 2 ranks verify every other file each
    assert runtime.verify_checkpoint(second, 1 - share, 2) is None
    problem = runtime.verify_checkpoint(second, share, 2)
    assert re.fullmatch(rf"{re.escape(second)}: corrupt checkpoint \(__0_0.distcp: sha256 differs from "
                        rf"manifest.json\); the previous checkpoint is {re.escape(first)}: move the corrupt one aside "
                        rf"to resume from it", problem), problem
    with pytest.raises(ValueError, match=re.escape(problem)):
        runtime.load_checkpoint(str(tmp_path))
    os.remove(os.path.join(second, ".metadata"))
    with pytest.raises(ValueError, match=r"\.metadata is missing"):
        runtime.load_checkpoint(second)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > " + os.environ["XM_PWNED"],))


def test_a_crafted_index_cannot_run_code(tmp_path, monkeypatch):
    """DCP's index is a pickle: read through an allow-list of DCP's classes, a payload is refused unrun (the
    sha256 in the manifest says nothing about who wrote the checkpoint)."""
    ck = runtime.Checkpointer(str(tmp_path), keep=5)
    path = save(ck, 1)
    monkeypatch.setenv("XM_PWNED", str(tmp_path / "pwned"))
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(_RunsCode(), f)
    with pytest.raises(ValueError, match=r"not a readable checkpoint .*system has no place in a checkpoint index"):
        runtime.read_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_replicated_state_is_split_by_size_the_same_way_on_every_rank():
    sizes = {"a": 100, "b": 60, "c": 50, "d": 10, "e": 10}
    owner = runtime.replicated_share(sizes, 2)
    assert owner == {"a": 0, "b": 1, "c": 1, "d": 0, "e": 0}  # 120 and 110 bytes (a tie goes to the lower rank)
    assert runtime.replicated_share(dict(reversed(sizes.items())), 2) == owner  # the order held is no matter
    assert set(runtime.replicated_share(sizes, 1).values()) == {0}


def test_a_run_converts_to_one_file_that_the_tools_and_a_resume_read(tmp_path, tiny_data, capsys):
    """python -m tools.export --to_file RUN OUT.pt: the single-file layout of older runs, with its sha256; the
    tools read both layouts, and a run resumes from either. An output that cannot be written is one line."""
    import tools
    from tools import export
    cfg = write_config(tmp_path / "c.py", tiny_data, out_dir=str(tmp_path / "run"), sample_tokens=0)
    train.train([cfg, "--max_steps=2"])
    out = str(tmp_path / "one.pt")
    export.main(["--to_file", str(tmp_path / "run"), out])
    assert runtime.verify_checkpoint(out) is None
    a, b = runtime.load_checkpoint(str(tmp_path / "run")), runtime.load_checkpoint(out)
    assert a["step"] == b["step"] == 2 and a["optim"]["kind"] == b["optim"]["kind"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]) and a["model"].keys() == b["model"].keys()
    for slot in ("rest", "hidden"):
        assert a["optim"][slot]["param_groups"] == b["optim"][slot]["param_groups"]
        assert all(torch.equal(a["optim"][slot]["state"][i][n], t) for i, s in b["optim"][slot]["state"].items()
                   for n, t in s.items())
    with pytest.raises(ValueError, match="exists"):
        export.main(["--to_file", str(tmp_path / "run"), out])
    with pytest.raises(SystemExit) as e:  # a file where the output's folder should be
        tools.run(lambda: export.main(["--to_file", str(tmp_path / "run"), os.path.join(out, "x.pt")]))
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and f"could not write {out}/x.pt (File exists: {out})" in err
    for src in (str(tmp_path / "run"), out):
        model, _, info = export.load_any(src)
        assert info["step"] == 2 and torch.equal(model.state_dict()["tok_emb.weight"], a["model"]["tok_emb.weight"])
    # the single file in place of the directory: the run resumes from it exactly as from the directory
    shutil.copytree(tmp_path / "run", tmp_path / "file_run")
    shutil.rmtree(tmp_path / "file_run" / "ckpt_00000002")
    shutil.copy(out, tmp_path / "file_run" / "ckpt_00000002.pt")
    shutil.copy(out + ".sha256", tmp_path / "file_run" / "ckpt_00000002.pt.sha256")
    from_dir = train.train([cfg, "--max_steps=4", "--resume"])
    from_file = train.train([cfg, "--max_steps=4", "--resume", f"--out_dir={tmp_path / 'file_run'}"])
    assert from_dir["losses"] == from_file["losses"] and len(from_dir["losses"]) == 2
