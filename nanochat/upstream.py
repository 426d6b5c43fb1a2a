"""Upstream karpathy/nanochat's checkpoints, read without running anything they hold.

Upstream's checkpoint_manager writes, per checkpoint folder (`<base>/base_checkpoints/<tag>/`,
`mid_checkpoints/`, `chatsft_checkpoints/`, `chatrl_checkpoints/`):
    model_<step>.pt           torch.save of the state dict (torch.compile's `_orig_mod.` prefix on
                              the keys of a compiled model; wte and value_embeds in bf16)
    meta_<step>.json          model_config (sequence_len, vocab_size, n_layer, n_head, n_kv_head,
                              n_embd, window_pattern) and training state we do not need
    optim_<step>_rank<r>.pt   not read
and beside them, in `<base>/tokenizer/`, `tokenizer.pkl` (a pickled tiktoken Encoding) and
`token_bytes.pt` (each id's length in bytes). The weights are read with torch's weights-only
unpickler and the tokenizer with `TokenizerUnpickler`, which builds nothing but plain data.

Eras. Upstream's model changed in place, its checkpoints say nothing about it but their keys: no
parameter beyond the transformer and lm_head is the classic model (before 2026-01-11; our
GPTConfig defaults); smear_gate is the model of a825e63 (2026-03-14) onwards, whose forward has
not changed since (presets.MODEL_2026). In between, the lambdas and value embeddings came with a
query/key scale, rotary base and gate that changed twice and are not in the file: refused.

Rotary convention. Upstream (and transformers) turn each (x[i], x[i+d/2]) pair of a head by
-theta, we by +theta. Negating the second half of every query and key head's rows of c_q and c_k
turns one into the other exactly: the QK norm and scale commute with the sign, and q.k sums the
products of both negated halves. `hf.flip_qk` does it (transformers' convention is upstream's).
"""

import io
import pickle
import re

import torch

from nanochat import hf, storage
from nanochat.gpt import GPTConfig
from nanochat.presets import MODEL_2026
from nanochat.tokenizer import Tokenizer

MODEL_RE = re.compile(r"^model_(\d+)\.pt$")
CONFIG_FIELDS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")  # all required
COMPILED_PREFIX = "_orig_mod."  # what torch.compile's wrapper adds to the keys of the model it wraps
MODEL_2026_KEY = "smear_gate.weight"  # smear came last (a825e63): with it, the rest is upstream's HEAD model
# the parameters the 2026 eras added, beyond the transformer and lm_head
EXTRA_PARAMS = re.compile(r"^(resid_lambdas|x0_lambdas|smear_gate\.weight|smear_lambda|backout_lambda|value_embeds\..*"
                          r"|transformer\.h\.\d+\.attn\.ve_gate\.weight)$")
# upstream's directories of checkpoints per model source
SOURCE_DIRS = {"base_checkpoints": "base", "mid_checkpoints": "mid", "chatsft_checkpoints": "sft",
               "chatrl_checkpoints": "rl"}
ENCODING_STATE = {"name": str, "pat_str": str, "mergeable_ranks": dict, "special_tokens": dict}


class UpstreamError(ValueError):
    """An upstream checkpoint or tokenizer that cannot be imported; the message names the file."""


# the tokenizer

class EncodingState:
    """Stands in for tiktoken.core.Encoding while unpickling: it keeps the state it is given and
    runs nothing (tiktoken's own __setstate__ would fetch a bare encoding name from the network)."""

    def __setstate__(self, state):
        self.state = state


class TokenizerUnpickler(pickle.Unpickler):
    """Unpickles upstream's tokenizer.pkl admitting one global, tiktoken.core.Encoding, as the
    inert EncodingState: a pickle naming any other callable (a crafted one) fails before it runs.
    Persistent ids are refused by pickle itself, as no persistent_load is defined."""

    def find_class(self, module, name):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return EncodingState
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed (only tiktoken.core.Encoding is)")


def load_tokenizer(uri):
    """Our Tokenizer of upstream's pickled tiktoken Encoding at `uri`: its split pattern and
    ranks, checked, with our special tokens at the ids upstream gave them."""
    data = storage.read_bytes(uri)
    try:
        loaded = TokenizerUnpickler(io.BytesIO(data)).load()
    except Exception as e:  # a file that is not the pickle upstream writes, whatever it holds
        raise UpstreamError(f"{uri}: not a pickled tiktoken encoding: {e}") from None
    state = getattr(loaded, "state", None) if isinstance(loaded, EncodingState) else None
    if isinstance(state, str):
        raise UpstreamError(f"{uri}: holds a bare encoding name ({state!r}), which tiktoken would fetch from the "
                            "network: refused (upstream nanochat pickles its whole encoding)")
    if not isinstance(state, dict) or state.keys() != ENCODING_STATE.keys():
        raise UpstreamError(f"{uri}: not a pickled tiktoken encoding (expected its state {sorted(ENCODING_STATE)})")
    if bad := [k for k, kind in ENCODING_STATE.items() if not isinstance(state[k], kind)]:
        raise UpstreamError(f"{uri}: fields {bad} of the encoding have the wrong type")
    ranks, specials = state["mergeable_ranks"], state["special_tokens"]
    if not all(isinstance(k, bytes) and type(v) is int for k, v in ranks.items()):
        raise UpstreamError(f"{uri}: mergeable_ranks is not a map of bytes to int ranks")
    if sorted(ranks.values()) != list(range(len(ranks))) or any(bytes([b]) not in ranks for b in range(256)):
        raise UpstreamError(f"{uri}: mergeable_ranks are not 0..n-1 with every single byte a token")
    try:
        tokenizer = Tokenizer(ranks, state["pat_str"])
    except ValueError as e:  # tiktoken could not compile the pattern
        raise UpstreamError(f"{uri}: {e}") from None
    if specials != tokenizer.special_ids:
        raise UpstreamError(f"{uri}: special tokens {specials} differ from nanochat's {tokenizer.special_ids}")
    return tokenizer


def check_token_bytes(uri, tokenizer):
    """Checks upstream's token_bytes.pt (each id's length in bytes, 0 for special tokens) against
    the tokenizer: a pair from two different trainings is refused."""
    lengths = load_tensors(uri)
    if not isinstance(lengths, torch.Tensor) or lengths.tolist() != tokenizer.token_byte_lengths():
        raise UpstreamError(f"{uri}: the token lengths differ from those of the tokenizer beside it")


# the weights

def load_tensors(uri):
    """What torch.save wrote at `uri`, through torch's weights-only unpickler (tensors and plain
    containers, nothing callable)."""
    data = storage.read_bytes(uri)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # weights-only unpickling refuses anything but tensors and plain data
        raise UpstreamError(f"{uri}: not a torch.save file of tensors: {e}") from None


def checkpoint_steps(names):
    """The steps of the checkpoints among the file names of an upstream checkpoint folder (those
    having both model_<step>.pt and meta_<step>.json), oldest first."""
    return sorted(int(m.group(1)) for m in map(MODEL_RE.match, names) if m and f"meta_{m.group(1)}.json" in names)


def checkpoint_files(directory, step):
    """(model URI, meta URI) of checkpoint `step` of upstream checkpoint folder `directory`."""
    return (storage.join(directory, f"model_{step:06d}.pt"), storage.join(directory, f"meta_{step:06d}.json"))


def read_checkpoint(model_uri, meta_uri):
    """(our GPTConfig, our state dict in fp32) of the checkpoint in model_<step>.pt and meta_<step>.json."""
    meta = storage.read_json(meta_uri)
    state = load_tensors(model_uri)
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise UpstreamError(f"{model_uri}: not a state dict (names to tensors)")
    state = {k.removeprefix(COMPILED_PREFIX): v for k, v in state.items()}
    config = model_config(meta.get("model_config") if isinstance(meta, dict) else None, state, meta_uri, model_uri)
    return config, our_state(state, config, model_uri)


def model_config(fields, state, meta_uri, model_uri):
    """Our GPTConfig of upstream's model_config and the era its state dict's keys tell."""
    if not isinstance(fields, dict):
        raise UpstreamError(f"{meta_uri}: no model_config")
    if unknown := sorted(set(fields) - {*CONFIG_FIELDS, "window_pattern"}):
        raise UpstreamError(f"{meta_uri}: model_config fields {unknown} are not upstream nanochat's")
    if missing := [k for k in CONFIG_FIELDS if k not in fields]:
        raise UpstreamError(f"{meta_uri}: model_config lacks {missing}")
    window_pattern = fields.get("window_pattern", "L")  # checkpoints from before windows have none
    if not isinstance(window_pattern, str):
        raise UpstreamError(f"{meta_uri}: model_config window_pattern {window_pattern!r} is not a string")
    extras = sorted(k for k in state if EXTRA_PARAMS.match(k))
    if MODEL_2026_KEY in state:
        options = {**MODEL_2026, "window_pattern": window_pattern}
    elif extras or "S" in window_pattern:
        raise UpstreamError(f"{model_uri}: an upstream model from between the classic one and a825e63 (2026-03-14): "
                            f"it has {', '.join(extras[:6]) or 'short windows'} but no {MODEL_2026_KEY}, and its "
                            "query/key scale, rotary base and value-embedding gate are not in the file; "
                            "load it in that upstream version and save it again from the current one")
    else:
        options = {"window_pattern": window_pattern}  # the classic model: GPTConfig's defaults
    try:
        return GPTConfig(**{k: fields[k] for k in CONFIG_FIELDS}, **options)
    except (TypeError, ValueError) as e:
        raise UpstreamError(f"{meta_uri}: model_config: {e}") from None


def our_state(state, config, uri):
    """Upstream's state dict as ours: the same names and shapes (rows of a vocabulary that was not
    yet padded to a multiple of 64 are padded with zeros), fp32, queries and keys flipped to our
    rotary convention."""
    expected = hf.shapes(config)
    if missing := sorted(expected.keys() - state.keys()):
        raise UpstreamError(f"{uri}: lacks {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
    if unknown := sorted(state.keys() - expected.keys()):
        raise UpstreamError(f"{uri}: has parameters nanochat's model does not: {', '.join(unknown[:6])}")
    out = {}
    for name, shape in expected.items():
        tensor = state[name].float()
        if hf.is_vocab(name) and tensor.shape[1:] == shape[1:] and tensor.shape[0] == config.vocab_size:
            tensor = hf.pad_vocab(tensor, shape[0])
        if tensor.shape != shape:
            raise UpstreamError(f"{uri}: {name} has shape {tuple(tensor.shape)}, its model_config says {shape}")
        out[name] = hf.flip_qk(name, tensor, config)
    return out
