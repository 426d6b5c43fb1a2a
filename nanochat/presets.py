"""Presets: plain data giving each stage's defaults. Every value is overridable by its option.

tiny  CI and tests: the whole DAG in a few minutes on 2 CPU cores.
cpu   a laptop: real learning in about an hour on 2 cores.
d20, d26, d32  one 8xGPU node, as in the original speedrun.
"""

TOKENIZER_GPU = {"vocab_size": 65536, "max_chars": 2_000_000_000, "doc_cap": 10_000}

PRESETS = {
    "tiny": {
        "tok_train": {"vocab_size": 2048, "max_chars": 5_000_000, "doc_cap": 10_000},
        "tok_eval": {"max_docs": 200},
        "download": {"num_shards": 2},
    },
    "cpu": {
        "tok_train": {"vocab_size": 8192, "max_chars": 200_000_000, "doc_cap": 10_000},
        "tok_eval": {"max_docs": 2000},
        "download": {"num_shards": -1},
    },
    # shards as in the original speedrun scripts (about 250M characters each upstream)
    "d20": {"tok_train": TOKENIZER_GPU, "tok_eval": {"max_docs": 10_000}, "download": {"num_shards": 240}},
    "d26": {"tok_train": TOKENIZER_GPU, "tok_eval": {"max_docs": 10_000}, "download": {"num_shards": 450}},
    "d32": {"tok_train": TOKENIZER_GPU, "tok_eval": {"max_docs": 10_000}, "download": {"num_shards": 800}},
}


def get(preset, stage):
    """The defaults of `stage` under `preset` (a copy; {} if the preset sets none)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(sorted(PRESETS))}")
    return dict(PRESETS[preset].get(stage, {}))
