# The ~20M μP proxy: xmodel25's recipe in miniature, on a laptop CPU, on the embedded default corpus.
# python train.py configs/proxy20m.py [--key=value ...]
#
# Shape: the recipe's own proxy family (RECIPE.md: heads = hidden/64, FFN = 2.5 x hidden, one KV group) at
# hidden 128 (m = 0.5) and 8 layers: the widest/deepest point of that family that still trains through
# every phase of the curriculum in about 10 minutes on 2 cores. Parameters: 17,926,272
# = 16,547,840 embedding (129,280 x 128) + 8 x 172,288 per block + 128 final norm; the full vocabulary is
# kept so the output layer costs what it costs in the real run. Same μP rules and the same base LRs as
# xmodel25: whatever is tuned here transfers unchanged.

# --- model ---
vocab_size = 129280
n_layer = 8
hidden = 128
ffn_hidden = 320
n_head = 2
n_kv_head = 1
rope_base = 500000.0
max_seq_len = 131072
norm_eps = 1e-5
tie_embeddings = True
use_mup = True
base_width = 256
input_scale = 12.0
output_scale = 1.0
residual_scale = 1.4
init_std = 0.1

# --- optimizer (base rates at width 256, exactly xmodel25's) ---
lr = 0.01
emb_lr = 0.01
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
adam_eps = 1e-8
grad_clip = 1.0
muon_momentum = 0.95
muon_rms_scale = 0.2

# --- run ---
device = "auto"
dtype = "auto"
compile = False
micro_batch = 8
tokenizer = "deepseek-v3"
out_dir = "out/proxy20m"
log_interval = 10
eval_interval = 100
eval_windows = 40
ckpt_interval = 100

# --- data: the embedded default corpus (Python's standard library: "code" and "prose"; generated chat
# problems: "sft") ---
data = None
mixtures = {
    "stable": {"prose": 0.5, "code": 0.5},
    # the recipe's decay and long-context mix: 66.87% SFT data, the rest pretraining text (prose:code 2:1)
    "decay": {"sft": 0.6687, "prose": 0.2209, "code": 0.1104},
}
eval_mix = "stable"

# --- the curriculum, same shape as xmodel25's: warmup, two stable stages (batch doubles), exponential
# decay to peak/16 with the AdamW -> Muon switch, then a two-step sequence-length stretch ---
phases = [
    dict(name="warmup", steps=30, lr=("linear", 0.0, 1.0), batch=8, seq_len=256, mix="stable", optimizer="adamw"),
    dict(name="stable1", steps=150, lr=("constant", 1.0, 1.0), batch=8, seq_len=256, mix="stable", optimizer="adamw"),
    dict(name="stable2", steps=120, lr=("constant", 1.0, 1.0), batch=16, seq_len=256, mix="stable", optimizer="adamw"),
    dict(name="decay", steps=60, lr=("exp", 1.0, 1 / 16), batch=16, seq_len=256, mix="decay", optimizer="muon"),
    dict(name="long512", steps=20, lr=("linear", 1 / 16, 0.04), batch=8, seq_len=512, mix="decay", optimizer="muon"),
    dict(name="long1024", steps=20, lr=("linear", 0.04, 6e-3), batch=4, seq_len=1024, mix="decay", optimizer="muon", micro_batch=4),
]
