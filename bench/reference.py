"""What the fast paths are measured and checked against: the plain KV cache of upstream's generation
loop (every row at the same position), for bench/inference.py's reference loop and the model's
KV-cache tests (tests/test_gpt.py)."""


class PlainKVCache:
    """Keys and values of the tokens seen so far, for every layer, in buffers of max_len positions
    allocated on first use with the dtype and device of the keys (nanochat.gpt.KVCache protocol)."""

    attn_mask = None  # every row at the same position: plain causal attention over the cache

    def __init__(self, n_layer, max_len):
        self.max_len = max_len
        self.pos = 0
        self.buffers = [None] * n_layer  # per layer: (2, B, n_kv_head, max_len, head_dim)

    def get_pos(self):
        return self.pos

    def insert_kv(self, layer_idx, k, v):
        """Stores k, v: (B, n_kv_head, T, head_dim) at positions pos..pos+T-1 and returns this
        layer's keys and values for positions 0..pos+T-1."""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions, {end} needed")
        if self.buffers[layer_idx] is None:
            B, H, _, D = k.shape
            self.buffers[layer_idx] = k.new_empty(2, B, H, self.max_len, D)
        buffer = self.buffers[layer_idx]
        buffer[0, :, :, self.pos:end] = k
        buffer[1, :, :, self.pos:end] = v
        return buffer[0, :, :, :end], buffer[1, :, :, :end]

    def advance(self, num_tokens):
        self.pos += num_tokens
