"""Tests for tools/export.py: a checkpoint becomes a stock LlamaForCausalLM with the same logits, and back.

The model is tiny (3 layers, hidden 64, GQA 4 query / 2 KV heads, RoPE base 2000: a value neither ours nor
transformers' default, so a dropped rope_theta shows up) with a 300-token byte-level BPE tokenizer trained
here. The DeepSeek-V3 tokenizer files are checked on a 1-layer model with the full 129,280 vocabulary.
"""
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

import data
import mup
import runtime
from model import ModelConfig, split_state_dict
from tools import export, sample

# the optional extras (requirements-extra.txt, installed in CI): only the tests that use them are skipped
needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="transformers is not installed (requirements-extra.txt)")
needs_safetensors = pytest.mark.skipif(importlib.util.find_spec("safetensors") is None,
                                       reason="safetensors is not installed (requirements-extra.txt)")

TINY = ModelConfig(vocab_size=300, n_layer=3, hidden=64, ffn_hidden=96, n_head=4, n_kv_head=2, rope_base=2000.0,
                   max_seq_len=256)
TEXT = "hello world, the quick brown fox jumps over the lazy dog. " * 3


def tiny_tokenizer(path) -> str:
    """A byte-level BPE tokenizer.json of < 300 ids with <|endoftext|> (id 0), trained on a sentence."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([TEXT] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.save(str(path))
    return str(path)


def make_run(tmp_path, cfg=TINY, tokenizer=None, seed=0, name="run"):
    """A checkpoint as train.py writes it, for a μP-initialized model; returns (run dir, model)."""
    tokenizer = tokenizer or tiny_tokenizer(tmp_path / "tokenizer.json")
    tok = data.get_tokenizer(tokenizer)
    torch.manual_seed(seed)
    model = mup.build_model(cfg)
    with torch.no_grad():  # norm gains away from 1, so a dropped norm weight would show
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    state = {"model": model.state_dict(), "model_config": asdict(cfg), "config": {"tokenizer": tokenizer},
             "tokenizer": tok.identity, "tokens": 1234, "optim": None, "rng": None}
    run = tmp_path / name
    runtime.save_checkpoint(str(run), 7, state, keep=1)
    return str(run), model.eval()


def hf_logits(folder, x):
    import transformers
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(x).logits


@needs_transformers
@pytest.mark.parametrize("variant", ["mup", "sp", "untied"])
def test_logits_equal_transformers(tmp_path, variant):
    cfg = {"mup": TINY, "sp": replace(TINY, use_mup=False), "untied": replace(TINY, tie_embeddings=False)}[variant]
    run, model = make_run(tmp_path, cfg)
    conf = export.export(run, str(tmp_path / "hf"))
    assert conf["rope_theta"] == 2000.0 and conf["num_key_value_heads"] == 2 and not conf["tie_word_embeddings"]
    x = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(x)
    theirs = hf_logits(str(tmp_path / "hf"), x)
    assert ours.abs().max() > 1.0  # not a trivially small comparison
    assert (ours - theirs).abs().max().item() < 1e-4


@needs_transformers
def test_rope_base_and_multipliers_are_needed(tmp_path):
    """The comparison above can fail: a wrong RoPE base, or an unfolded multiplier, changes the logits."""
    run, model = make_run(tmp_path)
    export.export(run, str(tmp_path / "hf"))
    x = torch.randint(0, 300, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(x)
    conf_path = tmp_path / "hf" / "config.json"
    conf = json.loads(conf_path.read_text())
    conf["rope_theta"] = 10000.0
    conf["rope_parameters"]["rope_theta"] = 10000.0
    conf_path.write_text(json.dumps(conf))
    assert (hf_logits(str(tmp_path / "hf"), x) - ours).abs().max() > 1e-2
    sd = export.export_tensors(TINY, model.state_dict(), torch.float32)
    parts = split_state_dict(model.state_dict(), TINY)  # our fused [q; k; v] apart
    assert not torch.equal(sd["model.layers.0.self_attn.q_proj.weight"], parts["blocks.0.attn.wq.weight"])
    assert torch.equal(sd["model.layers.0.self_attn.k_proj.weight"], parts["blocks.0.attn.wk.weight"])


@needs_safetensors
def test_export_is_readable_by_others_and_promises_the_trained_context(tmp_path):
    run, _ = make_run(tmp_path)
    old = os.umask(0o077)  # a private umask: the export is still for serving containers and other users
    try:
        conf = export.export(run, str(tmp_path / "hf"))
    finally:
        os.umask(old)
    assert (tmp_path / "hf").stat().st_mode & 0o777 == 0o755
    assert {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "hf").iterdir()} == \
        dict.fromkeys(["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                       "tokenizer_config.json", "special_tokens_map.json"], 0o644)
    assert conf["max_position_embeddings"] == TINY.max_seq_len  # no curriculum recorded: max_seq_len
    ckpt = runtime.load_checkpoint(run)
    ckpt["config"]["phases"] = [{"name": "a", "steps": 5, "seq_len": 64}, {"name": "b", "steps": 2, "seq_len": 128},
                                {"name": "long", "steps": 3, "seq_len": 200}]
    for step, want in ((0, 64), (5, 64), (6, 128), (7, 128), (8, 200), (10, 200)):
        runtime.save_checkpoint(str(tmp_path / "run2"), step, ckpt, keep=1)
        conf = export.export(str(tmp_path / "run2"), str(tmp_path / "hf2"), overwrite=True)
        tcfg = json.loads((tmp_path / "hf2" / "tokenizer_config.json").read_text())
        assert conf["max_position_embeddings"] == tcfg["model_max_length"] == want, step
    export.main([str(tmp_path / "run2"), str(tmp_path / "hf2"), "--overwrite", "--max_position_embeddings", "96"])
    assert json.loads((tmp_path / "hf2" / "config.json").read_text())["max_position_embeddings"] == 96
    with pytest.raises(ValueError, match="max_position_embeddings"):
        export.export(str(tmp_path / "run2"), str(tmp_path / "hf2"), overwrite=True, max_position_embeddings=257)


def readme_block(heading: str, lang: str) -> str:
    """The first ```lang block after `heading` in the README (the commands users copy)."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    return text[text.index(heading):].split(f"```{lang}\n", 1)[1].split("```", 1)[0]


@needs_transformers
def test_readme_transformers_usage_equals_tools_sample(tmp_path, capsys):
    """The README's code, as written: `tok(prompt)` (the tokenizer's defaults: BOS first) + greedy
    `generate` on the export continues exactly as `python -m tools.sample --temperature 0` (context: BOS)."""
    cfg = ModelConfig(vocab_size=129280, n_layer=2, hidden=32, ffn_hidden=64, n_head=2, n_kv_head=1, max_seq_len=256,
                      tie_embeddings=False)  # untied: an untrained tied model just repeats its last token
    run, _ = make_run(tmp_path, cfg, tokenizer="deepseek-v3")
    export.export(run, str(tmp_path / "hf"))
    code = readme_block("**transformers**", "python")
    assert code.count('"hf/xmodel25"') == 2 and 'reply = ' in code
    scope = {}
    exec(code.replace('"hf/xmodel25"', repr(str(tmp_path / "hf"))), scope)  # as a user would run it
    assert scope["ids"][0, 0].item() == 0  # BOS, added by the tokenizer's default
    new = scope["out"][0, scope["ids"].shape[1]:].tolist()
    new = new[:new.index(1)] if 1 in new else new  # sample.py stops at EOS and does not print it
    assert len(new) > 50
    # the text compared as tools.sample prints it: the README's reply skips special tokens, which an untrained
    # model does emit (DeepSeek-V3's placeholders)
    tok = data.get_tokenizer("deepseek-v3")
    capsys.readouterr()
    args = ["--prompt", "def fib(n):", "--temperature", "0", "--max_tokens", "100", "--device", "cpu",
            "--dtype", "float32"]
    for model in (str(tmp_path / "hf"), run):
        sample.main([model, *args])
        assert capsys.readouterr().out == "def fib(n):" + tok.decode(new) + "\n"
    sample.main([run, *args, "--no_bos"])  # BOS matters: without it the continuation differs
    assert capsys.readouterr().out != "def fib(n):" + tok.decode(new) + "\n"


@pytest.mark.skipif(importlib.util.find_spec("gguf") is None,
                    reason="gguf is not installed (requirements-extra.txt)")
@needs_safetensors
def test_export_tensors_map_to_gguf_llama_names(tmp_path):
    """llama.cpp's convert_hf_to_gguf.py (not on PyPI) names tensors through the gguf package's Llama map: every
    exported tensor must have a name there, and survive gguf's writer and reader unchanged."""
    import gguf
    import numpy as np
    from safetensors.torch import load_file
    run, _ = make_run(tmp_path)
    conf = export.export(run, str(tmp_path / "hf"))
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, conf["num_hidden_layers"])
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    w.add_context_length(conf["max_position_embeddings"])
    w.add_rope_freq_base(conf["rope_theta"])
    mapped = {}
    for name, t in tensors.items():
        mapped[name] = names.get_name(name, try_suffixes=(".weight",))
        assert mapped[name] is not None, f"{name} has no llama GGUF name"
        w.add_tensor(mapped[name], t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert r.fields["llama.context_length"].contents() == TINY.max_seq_len
    back = {t.name: np.asarray(t.data) for t in r.tensors}
    assert len(set(mapped.values())) == len(tensors) == len(back)
    for name, t in tensors.items():
        assert np.array_equal(back[mapped[name]].reshape(t.shape), t.numpy()), name


@pytest.mark.skipif(importlib.util.find_spec("gguf") is None,
                    reason="gguf is not installed (requirements-extra.txt)")
@needs_safetensors
def test_llama_cpp_converter_adds_bos(tmp_path):
    """llama.cpp's converter reads the tokenizer files through gguf.SpecialVocab: it must find BOS, to be added."""
    import gguf
    tok = bos_tokenizer(tmp_path)
    run, _ = make_run(tmp_path, tokenizer=str(tmp_path / "bos.json"))
    export.export(run, str(tmp_path / "hf"))
    sv = gguf.SpecialVocab(tmp_path / "hf", load_merges=False, n_vocab=TINY.vocab_size)
    assert sv.add_special_token["bos"] is True and sv.add_special_token.get("eos") is not True
    assert sv.special_token_ids["bos"] == tok.bos_id and sv.special_token_ids["eos"] == tok.eos_id


def test_folding_rules():
    m = export.multipliers(TINY)  # hidden 64 -> m = 1/4; head_dim 16
    assert m == {"embed_tokens": 12.0, "q_proj": 0.25, "o_proj": 1.4 / 3 ** 0.5, "down_proj": 1.4 / 3 ** 0.5,
                 "lm_head": 4.0}
    assert export.multipliers(replace(TINY, use_mup=False)) == dict.fromkeys(m, 1.0)


@needs_transformers
def test_deepseek_tokenizer_round_trip_and_chat_template(tmp_path):
    import transformers
    cfg = ModelConfig(vocab_size=129280, n_layer=1, hidden=32, ffn_hidden=64, n_head=2, n_kv_head=1, max_seq_len=4096)
    run, _ = make_run(tmp_path, cfg, tokenizer="deepseek-v3")
    export.export(run, str(tmp_path / "hf"), dtype="bfloat16")
    ds = data.get_tokenizer("deepseek-v3")
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert conf["bos_token_id"] == 0 and conf["eos_token_id"] == ds.eos_id == 1 and conf["vocab_size"] == 129280
    tc = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert tc["add_bos_token"] is True and tc["bos_token"] == "<｜begin▁of▁sentence｜>"
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    # the exported tokenizer.json (BOS post-processor added) is read back as the training tokenizer
    assert export.hf_dir_tokenizer(tmp_path / "hf") is ds and ds.identity["bos_id"] == 0
    for text in ["Hello, world!", "  def f(x):\n\treturn x ** 2  # 平方\n", "数学 1234567 ÷ 7 ≈ 176366.7",
                 "a<｜end▁of▁sentence｜>b"]:
        ids = hf_tok(text).input_ids  # what lm-evaluation-harness and vLLM do: BOS, as training documents open
        assert ids == [0] + ds.encode(text) == sample.prompt_ids(ds, text, chat=False)
        assert hf_tok.decode(ids[1:]) == ds.decode(ids[1:]) == text
    for msgs in ([{"role": "user", "content": "2+2?"}],
                 [{"role": "system", "content": "Be brief."}, {"role": "system", "content": "Be kind."},
                  {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                  {"role": "user", "content": "bye"}]):
        for gen in (False, True):
            assert hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) == \
                "<｜begin▁of▁sentence｜>" + data.render_chat(msgs, add_generation_prompt=gen)
    chat_ids = hf_tok.apply_chat_template(msgs[-1:], add_generation_prompt=True)  # tokenized: BOS once
    chat_ids = chat_ids["input_ids"] if isinstance(chat_ids, dict) or hasattr(chat_ids, "keys") else chat_ids
    assert chat_ids == sample.prompt_ids(ds, "bye", chat=True) and chat_ids[0] == 0 and chat_ids[1] != 0


def bos_tokenizer(tmp_path) -> data.Tokenizer:
    """The tiny tokenizer with a BOS token <s> added (bos.json)."""
    from tokenizers import Tokenizer
    tk = Tokenizer.from_file(tiny_tokenizer(tmp_path / "tokenizer.json"))
    tk.add_special_tokens(["<s>"])
    tk.save(str(tmp_path / "bos.json"))
    tok = data.get_tokenizer(str(tmp_path / "bos.json"))
    assert tok.bos_id == tk.token_to_id("<s>") < TINY.vocab_size and tok.doc_start == [tok.bos_id]
    return tok


@needs_safetensors
def test_bos_is_written_and_read_back(tmp_path):
    """A tokenizer with BOS exports add_bos_token and a BOS post-processor, and reads back as itself (export
    folder, import, load); a checkpoint from before BOS (no bos_id recorded) exports and samples without it."""
    tok = bos_tokenizer(tmp_path)
    run, _ = make_run(tmp_path, tokenizer=str(tmp_path / "bos.json"))
    export.export(run, str(tmp_path / "hf"))
    tc = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert tc["add_bos_token"] is True and tc["bos_token"] == "<s>"
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() != (tmp_path / "bos.json").read_bytes()
    again, _ = export.tokenizer_files(data.get_tokenizer(str(tmp_path / "hf" / "tokenizer.json")), 256)
    assert again["tokenizer.json"] == (tmp_path / "hf" / "tokenizer.json").read_bytes()  # adds BOS already: kept
    back = export.hf_dir_tokenizer(tmp_path / "hf")
    assert back.identity == tok.identity and back.encode(TEXT + "<s>") == tok.encode(TEXT + "<s>")
    export.main(["--import", str(tmp_path / "hf"), str(tmp_path / "back")])
    assert runtime.load_checkpoint(str(tmp_path / "back"))["tokenizer"] == tok.identity
    assert export.load_any(str(tmp_path / "hf"))[1].bos_id == export.load_any(str(tmp_path / "back"))[1].bos_id \
        == tok.bos_id
    ckpt = runtime.load_checkpoint(run)
    del ckpt["tokenizer"]["bos_id"]  # as checkpoints trained on EOS-only data record it
    runtime.save_checkpoint(str(tmp_path / "old"), 7, ckpt, keep=1)
    old = export.checkpoint_tokenizer(ckpt)
    assert old.bos_id is None and old.doc_start == [tok.eos_id]
    export.export(str(tmp_path / "old"), str(tmp_path / "hf_old"))
    assert json.loads((tmp_path / "hf_old" / "tokenizer_config.json").read_text())["add_bos_token"] is False
    assert (tmp_path / "hf_old" / "tokenizer.json").read_bytes() == (tmp_path / "bos.json").read_bytes()
    assert export.hf_dir_tokenizer(tmp_path / "hf_old").bos_id is None  # add_bos_token false, read back


@needs_safetensors
@pytest.mark.parametrize("dtype,tied", [("float32", True), ("float32", False), ("bfloat16", True)])
def test_export_import_export_is_lossless(tmp_path, dtype, tied):
    from safetensors.torch import load_file
    cfg = replace(TINY, tie_embeddings=tied)
    run, model = make_run(tmp_path, cfg)
    export.export(run, str(tmp_path / "hf1"), dtype=dtype)
    export.main(["--import", str(tmp_path / "hf1"), str(tmp_path / "back")])
    ckpt = runtime.load_checkpoint(str(tmp_path / "back"))
    assert ckpt["model_config"] == asdict(cfg) and ckpt["step"] == 7 and ckpt["tokens"] == 1234
    assert ckpt["optim"] is None and ckpt["tokenizer"] == data.get_tokenizer(str(tmp_path / "tokenizer.json")).identity
    export.main([str(tmp_path / "back"), str(tmp_path / "hf2"), "--dtype", dtype])
    a, b = load_file(str(tmp_path / "hf1" / "model.safetensors")), load_file(str(tmp_path / "hf2" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k  # bit-exact
    if dtype == "float32":  # the original weights: exact under power-of-two multipliers, else within 1 ulp
        orig = model.state_dict()
        for k, v in orig.items():
            assert ((ckpt["model"][k] - v).abs() <= 2.0 ** -23 * v.abs()).all(), k
        q = lambda sd: split_state_dict(sd, cfg)["blocks.0.attn.wq.weight"]  # noqa: E731 (the rows of [q; k; v])
        assert torch.equal(q(ckpt["model"]), q(orig))  # x 1/4


@needs_safetensors
def test_a_checkpoint_with_separate_q_k_v_exports_the_same(tmp_path):
    """A checkpoint written before q/k/v and gate/up were fused (their weights apart) exports the same tensors
    as the fused model's, and loads (load_any) into the same model."""
    from safetensors.torch import load_file
    run, model = make_run(tmp_path)
    ckpt = runtime.load_checkpoint(run)
    old = tmp_path / "old"
    runtime.save_checkpoint(str(old), 7, {**ckpt, "model": split_state_dict(ckpt["model"], TINY)}, keep=1)
    assert "blocks.0.attn.wq.weight" in runtime.load_checkpoint(str(old))["model"]
    for src, dst in ((run, "new_hf"), (str(old), "old_hf")):
        export.export(src, str(tmp_path / dst))
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("new_hf", "old_hf"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    loaded, _, _ = export.load_any(str(old))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_unfold_inverts_fold_exactly():
    """At the 1.3B model's multipliers (x12, 1.4/sqrt(48), 1/6, 1/8) and others, in float32 and bfloat16."""
    w = torch.randn(20000, generator=torch.Generator().manual_seed(0)) * 0.1
    for c in (12.0, 1.4 / 48 ** 0.5, 1 / 6, 0.125, 3.0):
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            y = export.fold(w, c, dt)
            assert torch.equal(export.fold(export.unfold(y, c), c, dt), y)
            e = export.fold(w, 12.0, dt)  # a tied embedding's two images
            x, inexact = export.unfold_tied(e, 12.0, y, c)
            assert inexact == 0 and torch.equal(export.fold(x, 12.0, dt), e) and torch.equal(export.fold(x, c, dt), y)
    naive = (export.fold(w, 12.0, torch.bfloat16).double() / 12).float()  # what the search improves on
    assert not torch.equal(export.fold(naive, 1 / 6, torch.bfloat16), export.fold(w, 1 / 6, torch.bfloat16))


@needs_transformers
def test_import_foreign_llama(tmp_path):
    """A Llama not written here (tied embeddings, no xmodel_mup) imports into μP or SP with the same logits."""
    import transformers
    hcfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, rope_theta=3000.0,
                                    rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=128)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hcfg).eval()
    # q/k far larger than Llama's 0.02 init: peaked attention, so a q/k layout or RoPE pairing error moves the
    # logits by ~0.7 (at 0.02, attention is near uniform and the same errors move them by < 0.02)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    hf.save_pretrained(str(tmp_path / "foreign"))
    x = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(x).logits
    for overrides in ({}, {"use_mup": False}):
        cfg, sd, _ = export.import_hf(str(tmp_path / "foreign"), overrides)
        assert cfg.rope_base == 3000.0 and cfg.n_kv_head == 2 and cfg.use_mup == (not overrides)
        with torch.no_grad():
            ours = export.build(cfg, sd)(x)
        assert (ours - ref).abs().max().item() < 1e-4


@needs_safetensors
def test_bad_inputs(tmp_path):
    run, _ = make_run(tmp_path)
    export.export(run, str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="not empty"):
        export.export(run, str(tmp_path / "hf"))
    export.export(run, str(tmp_path / "hf"), overwrite=True)
    # unknown architecture
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps(dict(conf, architectures=["MistralForCausalLM"])))
    with pytest.raises(ValueError, match="MistralForCausalLM"):
        export.import_hf(str(tmp_path / "hf"))
    # a folder whose weights are from another config
    foreign = dict(conf, hidden_size=128, head_dim=32)
    del foreign["xmodel_mup"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(foreign))
    with pytest.raises(ValueError, match="shapes do not match.*embed_tokens"):
        export.import_hf(str(tmp_path / "hf"))
    (tmp_path / "hf" / "config.json").write_text(json.dumps(dict(conf, xmodel_mup=None, num_hidden_layers=4)))
    with pytest.raises(ValueError, match="missing tensors.*layers.3"):
        export.import_hf(str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="not supported"):
        (tmp_path / "hf" / "config.json").write_text(json.dumps(dict(conf, xmodel_mup=None, rope_scaling={"rope_type": "yarn"})))
        export.import_hf(str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        export.import_hf(str(tmp_path))
    # a checkpoint whose weights do not fit its own config
    ckpt = runtime.load_checkpoint(run)
    ckpt["model_config"]["hidden"] = 128
    bad = tmp_path / "bad"
    runtime.save_checkpoint(str(bad), 1, ckpt, keep=1)
    with pytest.raises(ValueError, match="do not match its model config.*tok_emb"):
        export.export(str(bad), str(tmp_path / "hf3"))
    # a missing tokenizer
    os.remove(tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        export.export(run, str(tmp_path / "hf4"))
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        (tmp_path / "junk.pt").write_text("not a checkpoint")
        export.export(str(tmp_path / "junk.pt"), str(tmp_path / "hf5"))
    with pytest.raises(ValueError, match="--mup"):
        export.main(["--import", str(tmp_path / "hf"), str(tmp_path / "x"), "--mup", "nonsense=1"])
    assert not (tmp_path / "hf3").exists() and not (tmp_path / "hf4").exists()



@needs_safetensors
def test_overwrite_replaces_only_an_export(tmp_path):
    """--overwrite replaces a previous export, never a run directory, a checkpoint, a file or another folder
    given as the output by mistake (replacing deletes it), and says so before reading the checkpoint."""
    run, _ = make_run(tmp_path)
    ckpt = runtime.list_checkpoints(run)[-1]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    for out in (run, ckpt, str(tmp_path / "notes"), str(tmp_path / "tokenizer.json")):
        before = sorted(p.name for p in Path(out).iterdir()) if os.path.isdir(out) else Path(out).read_bytes()
        with pytest.raises(ValueError, match="not a Hugging Face model folder|is a file"):
            export.export(run, out, overwrite=True)
        assert before == (sorted(p.name for p in Path(out).iterdir()) if os.path.isdir(out) else Path(out).read_bytes())
    with pytest.raises(ValueError, match="not empty"):
        export.export(str(tmp_path / "missing"), run)  # the output is checked first
    export.export(run, str(tmp_path / "hf"))
    export.export(run, str(tmp_path / "hf"), overwrite=True, dtype="bfloat16")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with pytest.raises(SystemExit):  # 0 is not "the default"
        export.main([run, str(tmp_path / "hf"), "--overwrite", "--max_position_embeddings", "0"])
    for out in (tmp_path / "hf", tmp_path / "new"):  # --to_file into a folder: refused, nothing left in or beside it
        with pytest.raises(ValueError, match="is a directory: --to_file writes one file"):
            export.main(["--to_file", run, str(out) + "/", "--overwrite"])
    assert not (tmp_path / "new").exists() and not (tmp_path / "hf.sha256").exists()

def test_tokenizer_json_is_the_training_tokenizers_file(tmp_path):
    """data.tokenizer_json (the blob the export writes) hashes to the tokenizer's recorded sha256."""
    import hashlib
    for spec in ("deepseek-v3", tiny_tokenizer(tmp_path / "tokenizer.json")):
        tok = data.get_tokenizer(spec)
        assert hashlib.sha256(data.tokenizer_json(tok)).hexdigest() == tok.sha256
    files, ids = export.tokenizer_files(data.get_tokenizer(str(tmp_path / "tokenizer.json")), 256)
    assert files["tokenizer.json"] == (tmp_path / "tokenizer.json").read_bytes() and ids["eos_token_id"] == 0


@needs_safetensors
def test_cli_runs_as_a_module(tmp_path):
    """`python -m tools.export` from the repository root: an export, then an error exits 1 with its message."""
    run, _ = make_run(tmp_path)
    root = Path(__file__).resolve().parents[1]
    ok = subprocess.run([sys.executable, "-m", "tools.export", run, str(tmp_path / "hf")], cwd=root,
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "exported" in ok.stdout and (tmp_path / "hf" / "model.safetensors").is_file()
    bad = subprocess.run([sys.executable, "-m", "tools.export", run, str(tmp_path / "hf")], cwd=root,
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "error:" in bad.stderr and "not empty" in bad.stderr
