"""Config of a nanochat model with the 2026 options, for Hugging Face transformers (remote code).

Written by `nanochat export` next to the weights; loaded with trust_remote_code=True. Self-contained:
torch and transformers only. The fields are transformers' `nanochat` config's, plus the options.
"""

from transformers import PretrainedConfig


class NanoChatExtConfig(PretrainedConfig):
    model_type = "nanochat_ext"

    def __init__(self, vocab_size=65536, hidden_size=1280, intermediate_size=5120, num_hidden_layers=20,
                 num_attention_heads=10, num_key_value_heads=None, max_position_embeddings=2048,
                 rope_parameters=None, rms_norm_eps=1.1920928955078125e-07, hidden_act="relu2",
                 final_logit_softcapping=15.0, attention_bias=False, attention_dropout=0.0, initializer_range=0.02,
                 window_pattern="L", short_window=512, value_embeds=False, lambdas=False, smear=False, backout=False,
                 qk_scale=1.0, init="classic", use_cache=False, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rope_parameters = rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}
        self.rms_norm_eps = rms_norm_eps
        self.hidden_act = hidden_act
        self.final_logit_softcapping = final_logit_softcapping
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.window_pattern = window_pattern  # tiled over the layers, the last always L: S a short window, L the full context
        self.short_window = short_window  # the keys before a query that an S layer sees
        self.value_embeds = value_embeds
        self.lambdas = lambdas
        self.smear = smear
        self.backout = backout
        self.qk_scale = qk_scale
        self.init = init  # how the weights were first drawn (informative only)
        self.use_cache = use_cache  # the model has no KV cache: generation recomputes the sequence
        super().__init__(**kwargs)
