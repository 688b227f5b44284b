# Xmodel-2.5, the 1.3B run (RECIPE.md): 48 x 1536, μP from base width 256, WSD curriculum of 560k steps.
# torchrun --nproc_per_node=8 train.py configs/xmodel25.py [--key=value ...]

# --- model (model.ModelConfig) ---
vocab_size = 129280          # DeepSeek-V3 tokenizer (128,815 tokens) padded to a multiple of 128
n_layer = 48
hidden = 1536
ffn_hidden = 3840
n_head = 24
n_kv_head = 8
rope_base = 500000.0         # unchanged through the long-context phases (no rope scaling)
max_seq_len = 131072
norm_eps = 1e-5
tie_embeddings = True
use_mup = True
base_width = 256             # m = 1536 / 256 = 6
input_scale = 12.0
output_scale = 1.0
residual_scale = 1.4
init_std = 0.1

# --- optimizer: base (width-256) rates; mup.param_groups resolves hidden 0.01/6 = 1.6667e-3, embedding 0.01 ---
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
compile = True
fp8 = True                   # the paper's FP8 hybrid recipe in the blocks' linear layers
micro_batch = 4              # sequences per GPU per forward at 3712 tokens; the long phases set their own
tokenizer = "deepseek-v3"
out_dir = "out/xmodel25"
log_interval = 10
eval_interval = 2000
eval_windows = 100
ckpt_interval = 1000
gpus = 16                    # data-parallel GPUs the dry run plans for (2 nodes x 8; torchrun sets the real number)

# --- data: source name -> prepared dataset (python data.py prepare --out DIR --source NAME=PATH ...) ---
data = {s: f"data/{s}" for s in [
    "ultrafineweb-en", "ultrafineweb-zh", "starcoder", "books", "algebraic-stack", "open-web-math", "wiki",
    "arxiv", "stackexchange", "reddit", "pes2o", "megawika", "tulu_flan", "sft"]}
mixtures = {
    "stable": {"ultrafineweb-en": 0.41, "ultrafineweb-zh": 0.20, "starcoder": 0.26, "books": 0.01,
               "algebraic-stack": 0.005, "open-web-math": 0.005, "wiki": 0.01, "arxiv": 0.0133,
               "stackexchange": 0.009, "reddit": 0.0391, "pes2o": 0.0285, "megawika": 0.0023,
               "tulu_flan": 0.0078},
    "decay": {"ultrafineweb-en": 0.18725, "ultrafineweb-zh": 0.03716, "starcoder": 0.02209, "books": 0.00287,
              "algebraic-stack": 0.01722, "open-web-math": 0.01722, "wiki": 0.01147, "stackexchange": 0.009,
              "reddit": 0.009, "megawika": 0.01801, "sft": 0.6687},
}
eval_mix = "stable"

# --- the Warmup-Stable-Decay curriculum. lr = (shape, start, end) as fractions of each group's peak LR;
# "exp" is the recipe's lr = end + (2 * 0.5**r - 1) * (start - end), r from 0 to 1 over the phase.
# mfu: the dry run's cost per phase, as measured on one H200 (late 2026-11; torch 2.11, FP8, compiled, the trainer
# under torchrun): 3712 tokens 0.46-0.48, the decay with Muon 0.38 (before Newton-Schulz was batched by shape),
# 8k and 12k tokens 0.25-0.26 (16k: 12k's). Many nodes add communication: lower them for a cluster. ---
phases = [
    dict(name="warmup", steps=2000, lr=("linear", 0.0, 1.0), batch=480, seq_len=3712, mix="stable", optimizer="adamw", mfu=0.46),
    dict(name="stable1", steps=268000, lr=("constant", 1.0, 1.0), batch=480, seq_len=3712, mix="stable", optimizer="adamw", mfu=0.46),
    dict(name="stable2", steps=260000, lr=("constant", 1.0, 1.0), batch=960, seq_len=3712, mix="stable", optimizer="adamw", mfu=0.46),
    dict(name="decay", steps=20000, lr=("exp", 1.0, 1 / 16), batch=960, seq_len=3712, mix="decay", optimizer="muon", mfu=0.38),
    # long context (the scripts: 500 steps from 1e-6 back up to the decay's last LR, then linear to 1e-5;
    # as fractions of the hidden peak 1.6667e-3: 6e-4 -> 1/16 -> 6e-3, the linear part spread over both lengths)
    dict(name="rewarm8k", steps=500, lr=("linear", 6e-4, 1 / 16), batch=480, seq_len=8192, mix="decay", optimizer="muon", micro_batch=2, mfu=0.25),
    dict(name="long8k", steps=2500, lr=("linear", 1 / 16, 0.047632), batch=480, seq_len=8192, mix="decay", optimizer="muon", micro_batch=2, mfu=0.25),
    dict(name="long16k", steps=7000, lr=("linear", 0.047632, 6e-3), batch=240, seq_len=16384, mix="decay", optimizer="muon", micro_batch=1, mfu=0.25),
]
act_ckpt = False             # set True (or per run) for 16k-token sequences on smaller GPUs
