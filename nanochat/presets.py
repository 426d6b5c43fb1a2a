"""Presets: plain data giving each stage's defaults. Every value is overridable by its option.

tiny  CI and tests: the whole DAG in a few minutes on 2 CPU cores.
cpu   a laptop: your own chat model in under an hour on 2 cores (docs/cpu-preset.md).
d24   one 8xGPU node: upstream nanochat's 2026 speedrun (runs/speedrun.sh), with our mid_train and chat_rl
      (a flow's skip=["mid_train", "chat_rl"] leaves them out, as upstream does).
d20, d26, d32  one 8xGPU node, the same recipe at other depths.

Where a value is upstream's, its comment names the file of karpathy/nanochat (at 92d63d4) it is read from.
"""

# scripts/tok_train.py: 2^15 tokens (its default since upstream's ccf4b7f), and runs/speedrun.sh: ~2B characters
TOKENIZER_GPU = {"vocab_size": 32768, "max_chars": 2_000_000_000, "doc_cap": 10_000}

# The classic recipe: nanochat's model, optimizer and schedules of late 2025.
CLASSIC_MODEL = {"window_pattern": "L", "value_embeds": False, "lambdas": False, "smear": False, "backout": False,
                 "qk_scale": 1.0, "rope_base": 10000.0, "init": "classic"}
CLASSIC_OPTIMIZER = {"optimizer_recipe": "classic", "matrix_lr": 0.02, "embedding_lr": 0.2, "unembedding_lr": 0.004,
                     "scalar_lr": 0.5, "weight_decay": 0.0}
CLASSIC_SCHEDULES = {"warmup_steps": 0, "warmdown_ratio": 0.2, "final_lr_frac": 0.0, "momentum_schedule": "classic",
                     "weight_decay_schedule": "constant"}
CLASSIC_HORIZON = {"total_batch_size": 524288, "batch_lr_scaling": False, "param_data_ratio": 20.0}

# Upstream nanochat's 2026 recipe, in the four groups bench/recipe_ablation.py measures one by one.
MODEL_2026 = {
    "window_pattern": "SSSL",  # nanochat/gpt.py GPTConfig.window_pattern
    "value_embeds": True, "lambdas": True, "smear": True, "backout": True,  # nanochat/gpt.py GPT.__init__
    "qk_scale": 1.2,  # nanochat/gpt.py CausalSelfAttention.forward
    "rope_base": 100000.0,  # nanochat/gpt.py GPT._precompute_rotary_embeddings
    "init": "2026",  # nanochat/gpt.py GPT.init_weights
}
OPTIMIZER_2026 = {
    "optimizer_recipe": "2026",  # nanochat/optim.py (NorMuon, cautious weight decay, MuonEq, Muon+); gpt.py setup_optimizer
    "matrix_lr": 0.02, "embedding_lr": 0.3, "unembedding_lr": 0.008, "scalar_lr": 0.5,  # scripts/base_train.py defaults
    "weight_decay": 0.28,  # scripts/base_train.py --weight-decay
}
SCHEDULES_2026 = {
    "warmup_steps": 40, "warmdown_ratio": 0.65, "final_lr_frac": 0.05,  # scripts/base_train.py get_lr_multiplier
    "momentum_schedule": "2026",  # scripts/base_train.py get_muon_momentum
    "weight_decay_schedule": "cosine",  # scripts/base_train.py get_weight_decay
}
HORIZON_2026 = {
    "total_batch_size": -1, "batch_lr_scaling": True,  # scripts/base_train.py steps 2) to 4)
    "param_data_ratio": 12.0,  # scripts/base_train.py --target-param-data-ratio
}
RECIPE_GROUPS = {"model": (CLASSIC_MODEL, MODEL_2026), "optimizer": (CLASSIC_OPTIMIZER, OPTIMIZER_2026),
                 "schedules": (CLASSIC_SCHEDULES, SCHEDULES_2026), "horizon": (CLASSIC_HORIZON, HORIZON_2026)}
CLASSIC = {k: v for classic, _ in RECIPE_GROUPS.values() for k, v in classic.items()}
RECIPE_2026 = {k: v for _, new in RECIPE_GROUPS.values() for k, v in new.items()}

# base_train values every preset shares; each preset adds the rest.
BASE_TRAIN = {
    **CLASSIC, "n_kv_head": None, "num_steps": -1, "target_flops": -1.0, "fp8": False,
    "eval_tokens": 10 * 524288, "eval_every": 250, "sample_every": 2000, "checkpoint_every": 1000,
    "keep_last": 2, "head_dim": 128, "max_seq_len": 2048, "core_every": 2000, "core_max_per_task": 500,
}


def base_train(**overrides):
    return {**BASE_TRAIN, **overrides}


# mid_train and chat_sft: nanochat's settings (SFT at 2% of the base learning rates, decaying to 0)
FINETUNE = {"matrix_lr": 0.02, "embedding_lr": 0.2, "unembedding_lr": 0.004, "weight_decay": 0.0, "warmup_steps": 0,
            "warmdown_ratio": 0.2, "eval_every": 150, "checkpoint_every": 200, "keep_last": 2, "eval_conversations": 200,
            "identity_weight": 2.0, "spelling_size": 10_000, "max_seq_len": None, "smoltalk_weight": 1.0,
            "smoltalk_max_chars": None, "gsm8k_weight": 1.0}
SFT_LR = {"matrix_lr": 0.0004, "embedding_lr": 0.004, "unembedding_lr": 0.00008, "warmdown_ratio": 1.0}


def mid_train(**overrides):
    return {**FINETUNE, **overrides}


def chat_sft(**overrides):
    return {**FINETUNE, **SFT_LR, **overrides}


# chat_rl: nanochat's settings (5% of the base learning rates, decaying to 0)
RL = {"matrix_lr": 0.001, "embedding_lr": 0.01, "unembedding_lr": 0.0002, "weight_decay": 0.0, "warmup_steps": 0,
      "warmdown_ratio": 1.0, "temperature": 1.0, "top_k": 50, "max_new_tokens": 256, "checkpoint_every": 60,
      "keep_last": 2, "eval_every": 60, "eval_examples": 400, "examples_per_step": 16, "num_samples": 16,
      "num_steps": 467}


def chat_rl(**overrides):
    return {**RL, **overrides}


CHAT_EVAL = {"max_problems": -1, "max_generative": -1, "batch_size": 8, "max_new_tokens": 512, "temperature": 0.0}


def base_eval(**overrides):
    return {"max_per_task": -1, "eval_tokens": BASE_TRAIN["eval_tokens"], "unigram_tokens": 20_000_000, **overrides}


# GPU presets compile the model as upstream does: pretraining rows and packed conversation rows
# have one shape.
GPU_COMPILE = {"compile": True}


# scripts/chat_sft.py: pretraining's learning rates (its defaults, inherited) at --init-lr-frac 0.8,
# no weight decay, the warm-down over the last half to 0, momentum 0.85 -> 0.95 over 300 steps
# (classic), one epoch (--num-iterations -1) of SmolTalk + MMLU auxiliary_train x3 + GSM8K x4,
# --load-optimizer 1, ChatCORE every 200 steps on up to 24 problems of each generative task (and
# every categorical one), 512 new tokens. Ours besides: SpellingBee and the identity conversations
# (x2, as upstream had them until its 950a1dc dropped both).
SFT_2026 = {**{k: OPTIMIZER_2026[k] for k in ("matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr")},
            "init_lr_frac": 0.8, "weight_decay": 0.0, "warmdown_ratio": 0.5, "final_lr_frac": 0.0, "num_steps": -1,
            "smoltalk_weight": 1.0, "mmlu_weight": 3.0, "gsm8k_weight": 4.0, "eval_every": 200, "warm_start_optimizer": True,
            "chatcore_every": 200, "chatcore_max_problems": -1, "chatcore_max_generative": 24, "chatcore_max_new_tokens": 512}


def gpu_preset(depth, device_batch_size, num_shards, batch, **base):
    """An 8xGPU preset at `depth`: the 2026 recipe on ClimbMix, the device batch sizes upstream's
    scripts set for 80 GB GPUs, and `num_shards` ClimbMix shards: the horizon's tokens at about 47M
    tokens a shard (upstream's dev/LOG.md: 150 shards are about 7B tokens), plus some to spare.
    `batch`: base_train's total batch at this depth (its automatic one, tests/test_presets.py checks),
    which chat_sft inherits as upstream's does, in rows of max_seq_len + 1 tokens."""
    sft_batch = batch * (BASE_TRAIN["max_seq_len"] + 1) // BASE_TRAIN["max_seq_len"]
    return {"tok_train": TOKENIZER_GPU, "tok_eval": {"max_docs": 10_000},
            # ClimbMix: README leaderboard, 2.76 -> 2.02 h; MMLU's auxiliary_train for chat_sft
            "download": {"num_shards": num_shards, "source": "climbmix", "mmlu_train": True},
            # validation tokens: scripts/base_train.py --eval-tokens, scripts/base_eval.py --split-tokens
            "base_train": base_train(**{**GPU_COMPILE, **RECIPE_2026, "depth": depth, "eval_tokens": 80 * 524288,
                                        "device_batch_size": device_batch_size, "num_shards": num_shards, **base}),
            "base_eval": base_eval(device_batch_size=device_batch_size, num_shards=num_shards, eval_tokens=40 * 524288),
            "mid_train": mid_train(**GPU_COMPILE, optimizer_recipe="2026", device_batch_size=device_batch_size,
                                   total_batch_size=524544, num_steps=800),
            "chat_sft": chat_sft(**GPU_COMPILE, **SFT_2026, optimizer_recipe="2026", device_batch_size=device_batch_size,
                                 total_batch_size=sft_batch),
            "chat_eval": CHAT_EVAL,
            "chat_rl": chat_rl(optimizer_recipe="2026")}


PRESETS = {
    "tiny": {
        "tok_train": {"vocab_size": 2048, "max_chars": 5_000_000, "doc_cap": 10_000},
        "tok_eval": {"max_docs": 200},
        "download": {"num_shards": 2},
        # the GPU presets' recipe (less its horizon), so the tests run the code a GPU run does;
        # its warm-up scaled to 20 steps; no backout, which needs 3 layers (GPTConfig.backout_layer)
        "base_train": base_train(**{**MODEL_2026, **OPTIMIZER_2026, **SCHEDULES_2026, "warmup_steps": 2, "backout": False},
                                 depth=2, head_dim=64, n_kv_head=1, max_seq_len=128, device_batch_size=4,
                                 total_batch_size=1024, num_steps=20, eval_every=10, eval_tokens=4096,
                                 sample_every=-1, checkpoint_every=10, num_shards=2, core_every=-1),
        "base_eval": {"max_per_task": 8, "eval_tokens": 4096, "unigram_tokens": 65536, "device_batch_size": 4,
                      "num_shards": 2},
        "mid_train": mid_train(optimizer_recipe="2026", device_batch_size=4, total_batch_size=1032, num_steps=10,
                               eval_every=-1, checkpoint_every=5, eval_conversations=8, spelling_size=50),
        "chat_sft": chat_sft(optimizer_recipe="2026", device_batch_size=4, total_batch_size=1032, num_steps=10,
                             eval_every=-1, checkpoint_every=5, eval_conversations=8, spelling_size=50),
        "chat_rl": chat_rl(optimizer_recipe="2026", examples_per_step=2, num_samples=4, max_new_tokens=16, num_steps=4, checkpoint_every=2,
                           eval_every=-1, eval_examples=4),
        "chat_eval": {**CHAT_EVAL, "max_problems": 4, "max_generative": 4, "max_new_tokens": 24},
    },
    "cpu": {  # docs/cpu-preset.md: how these were chosen (bench/cpu_sweep.py, bench/learner_run.py)
        "tok_train": {"vocab_size": 8192, "max_chars": 200_000_000, "doc_cap": 10_000},
        "tok_eval": {"max_docs": 2000},
        # text enough for tok_train's 200M characters (base_train's 17M tokens take about 70M): one real
        # FineWeb-EDU shard of about 250M, or all of a smaller mirror's (../shared/data: 178M in 23)
        "download": {"num_shards": -1, "min_chars": 200_000_000},
        # the 2026 model and schedules with the classic optimizer and horizon: the best arm of
        # docs/recipe-ablation.md (its Muon rate doubled won there, lost over the 2,070 steps: same page);
        # 2,070 steps take the time 2,000 classic ones did (1.89 vs 1.96 CPU-s a step)
        "base_train": base_train(**MODEL_2026, **SCHEDULES_2026, depth=4, head_dim=64, max_seq_len=512,
                                 device_batch_size=8, total_batch_size=8192, num_steps=2070, eval_every=250,
                                 eval_tokens=65536, sample_every=500, checkpoint_every=250, num_shards=-1, core_every=-1),
        "base_eval": {"max_per_task": 100, "eval_tokens": 262144, "unigram_tokens": 4_000_000, "device_batch_size": 8,
                      "num_shards": -1},
        "mid_train": mid_train(device_batch_size=8, total_batch_size=16416, num_steps=150, eval_every=50,
                               checkpoint_every=50, eval_conversations=100, spelling_size=2000, identity_weight=5.0),
        # short conversations, several passes: a model this small learns to end its replies
        "chat_sft": chat_sft(rows="pad", device_batch_size=8, total_batch_size=16416, num_steps=300, eval_every=100,
                             checkpoint_every=100, eval_conversations=100, smoltalk_weight=2.0, smoltalk_max_chars=1000,
                             gsm8k_weight=0.05, spelling_size=50, identity_weight=8.0),
        "chat_rl": chat_rl(examples_per_step=8, num_samples=8, max_new_tokens=192, num_steps=16, checkpoint_every=8,
                           eval_every=-1, eval_examples=32),
        # every categorical problem, the first 200 of each generative task (HumanEval has 164)
        "chat_eval": {**CHAT_EVAL, "max_generative": 200, "max_new_tokens": 256, "batch_size": 16},
    },
    # d24 is upstream's speedrun (runs/speedrun.sh: --depth=24 --target-param-data-ratio=8
    # --device-batch-size=16 --fp8); the other depths take the same recipe at upstream's default ratio
    "d20": gpu_preset(depth=20, device_batch_size=32, num_shards=150, batch=2**20),  # 5.7B tokens
    "d24": gpu_preset(depth=24, device_batch_size=16, num_shards=170, batch=2**20, param_data_ratio=8.0,
                      fp8=True),  # speedrun.sh -n 170
    "d26": gpu_preset(depth=26, device_batch_size=16, num_shards=280, batch=2**20),  # 11.7B tokens
    "d32": gpu_preset(depth=32, device_batch_size=8, num_shards=500, batch=2**21),  # 21B tokens
}

# Presets for a GPU node: their stages run one process per GPU by default, and their device batch
# sizes are sized, as upstream's, for GPUs of this much memory (smaller GPUs get a smaller one).
GPU_PRESETS = {"d20", "d24", "d26", "d32"}
SIZED_FOR_GPU_GB = 80



def cpu_nproc(preset):
    """Processes per node on a CPU preset: the cpu preset's two single-threaded processes use 2
    cores best; tiny runs one."""
    return 2 if preset == "cpu" else 1


HOUR = 3600
# How long a stage may run before it is failed (and retried, resuming from its checkpoints), and how
# long a collective may wait for a silent peer before the process group gives up (a dead node
# fails the stage in that time, instead of torch's default 10 or 30 minutes). Per preset, by module.
GPU_TIMEOUTS = {"download": 3 * HOUR, "tok_train": 2 * HOUR, "tok_eval": HOUR, "base_eval": 3 * HOUR, "mid_train": 4 * HOUR,
                "chat_sft": 3 * HOUR, "chat_eval": 4 * HOUR, "chat_rl": 8 * HOUR, "base_train": 12 * HOUR}
LIMITS = {
    "tiny": {"stage_timeout_s": dict.fromkeys(GPU_TIMEOUTS, HOUR // 2), "collective_timeout_s": 60},
    "cpu": {"stage_timeout_s": {**dict.fromkeys(GPU_TIMEOUTS, 2 * HOUR), "base_train": 6 * HOUR},
            "collective_timeout_s": 300},
    "d20": {"stage_timeout_s": GPU_TIMEOUTS, "collective_timeout_s": 900},
    "d24": {"stage_timeout_s": GPU_TIMEOUTS, "collective_timeout_s": 900},
    "d26": {"stage_timeout_s": {**GPU_TIMEOUTS, "base_train": 30 * HOUR}, "collective_timeout_s": 900},
    "d32": {"stage_timeout_s": {**GPU_TIMEOUTS, "base_train": 72 * HOUR}, "collective_timeout_s": 900},
}


def stage_timeout(preset, module):
    """Seconds stage `module` may run under `preset`."""
    get(preset, module)  # the unknown-preset error
    return LIMITS[preset]["stage_timeout_s"][module]


def collective_timeout(preset):
    """Seconds a collective waits for a silent peer under `preset`."""
    get(preset, "base_train")
    return LIMITS[preset]["collective_timeout_s"]


# Presets whose flow runs one stage at a time: on 2 CPU cores, two stages side by side would only
# share the cores (and their spinning threads slow each other down).
ONE_STAGE_AT_A_TIME = {"cpu"}


def get(preset, stage):
    """The defaults of `stage` under `preset` (a copy; {} if the preset sets none)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(sorted(PRESETS))}")
    return dict(PRESETS[preset].get(stage, {}))


def flags(options):
    """The command-line flags that set `options` ({name: value}) on a stage: --no-<name> for False."""
    out = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        out += [flag] if value is True else ["--no-" + flag[2:]] if value is False else [flag, str(value)]
    return out
