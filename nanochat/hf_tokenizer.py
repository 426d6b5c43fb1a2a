"""Our tokenizer as Hugging Face files, and back: tokenizer.json (the `tokenizers` library's format,
which AutoTokenizer loads), tokenizer_config.json and the chat template. Plain JSON and text; neither
transformers nor tokenizers is imported.

Our tokenizer is tiktoken's byte-level BPE: a piece of text is split by the pattern, and within a
piece the adjacent pair whose concatenation has the lowest rank merges first. `tokenizers` expresses
that as a BPE whose merges are every split of every token into two tokens, ordered by the rank of
the token they make (as transformers' TikTokenConverter does), with ignore_merges (a piece that is
a token is taken whole, as tiktoken does). The two can differ only where one token has two
different splits both available in one piece (tiktoken takes the leftmost); tests compare real text.

What the HF files do differently from us, on purpose or unavoidably:
- `tokenizer(text)` puts <|bos|> first (the post-processor), as our documents start; the chat
  template writes its own <|bos|> and apply_chat_template adds no other.
- special-token strings inside text become special tokens in `tokenizers` (ours encodes them as
  text); apply_chat_template(..., sanitize_control_tokens=True) (transformers 5.20+) avoids that.
- two adjacent text parts of an assistant message are one string to the template, encoded apart by us.
"""

from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer

BOS, EOS = "<|bos|>", "<|assistant_end|>"  # eos: the end of an assistant turn, where chat generation stops

# Renders a conversation as Tokenizer.render_for_completion does with the shapes API clients send
# (normalize_messages' `lenient`: system and developer messages fold into the next user message,
# turns in a row from one role are joined), and with add_generation_prompt as render_for_completion
# (a final assistant message is dropped, then <|assistant_start|>); continue_final_message keeps it
# open, as render_for_completion(..., continue_final_message=True).
CHAT_TEMPLATE = """\
{%- set ns = namespace(out=[], system=none) -%}
{%- for message in messages -%}
  {%- set content = message['content'] -%}
  {%- if message['role'] in ['system', 'developer'] -%}
    {%- if content is not string -%}
      {{- raise_exception('system content must be a string') -}}
    {%- endif -%}
    {%- set ns.system = content if ns.system is none else ns.system + '\\n\\n' + content -%}
  {%- else -%}
    {%- if message['role'] == 'user' and ns.system is not none -%}
      {%- if content is not string -%}
        {{- raise_exception('user content must be a string') -}}
      {%- endif -%}
      {%- set content = ns.system + '\\n\\n' + content -%}
      {%- set ns.system = none -%}
    {%- endif -%}
    {%- if ns.out and ns.out[-1]['role'] == message['role'] -%}
      {%- set first = ns.out[-1]['content'] -%}
      {%- if first is string and content is string -%}
        {%- set content = first + '\\n\\n' + content -%}
      {%- else -%}
        {%- set first = [{'type': 'text', 'text': first}] if first is string else first -%}
        {%- set second = [{'type': 'text', 'text': content}] if content is string else content -%}
        {%- set content = first + [{'type': 'text', 'text': '\\n\\n'}] + second -%}
      {%- endif -%}
      {%- set ns.out = ns.out[:-1] -%}
    {%- endif -%}
    {%- set ns.out = ns.out + [{'role': message['role'], 'content': content}] -%}
  {%- endif -%}
{%- endfor -%}
{%- if ns.system is not none -%}
  {{- raise_exception('a system message must be followed by a user message') -}}
{%- endif -%}
{%- set messages = ns.out -%}
{%- if add_generation_prompt and messages and messages[-1]['role'] == 'assistant' -%}
  {%- set messages = messages[:-1] -%}
{%- endif -%}
<|bos|>
{%- for message in messages -%}
  {%- if message['role'] != ['user', 'assistant'][loop.index0 % 2] -%}
    {{- raise_exception('roles must alternate, user first') -}}
  {%- endif -%}
  {%- if message['role'] == 'user' -%}
    {%- if message['content'] is not string -%}
      {{- raise_exception('user content must be a string') -}}
    {%- endif -%}
    <|user_start|>{{ message['content'] }}<|user_end|>
  {%- else -%}
    <|assistant_start|>
    {%- if message['content'] is string -%}
      {{- message['content'] -}}
    {%- else -%}
      {%- for part in message['content'] -%}
        {%- if part['type'] == 'text' -%}
          {{- part['text'] -}}
        {%- elif part['type'] == 'python' -%}
          <|python_start|>{{ part['text'] }}<|python_end|>
        {%- elif part['type'] == 'python_output' -%}
          <|output_start|>{{ part['text'] }}<|output_end|>
        {%- else -%}
          {{- raise_exception('assistant parts are of type text, python or python_output') -}}
        {%- endif -%}
      {%- endfor -%}
    {%- endif -%}
    <|assistant_end|>
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  <|assistant_start|>
{%- endif -%}
"""


class TokenizerFileError(ValueError):
    """A tokenizer.json that is not our kind of tokenizer; the message names the field."""


def byte_to_unicode():
    """GPT-2's byte-level alphabet: each byte as a printable character (the printable Latin-1 bytes
    as themselves, the others as chr(256 + k) in byte order), so tokens are strings in JSON."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table, k = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + k)
            k += 1
    return table


BYTE_TO_UNICODE = byte_to_unicode()
UNICODE_TO_BYTE = {c: b for b, c in BYTE_TO_UNICODE.items()}


def _text(token):
    return "".join(BYTE_TO_UNICODE[b] for b in token)


def _splits(ranks):
    """Every (left, right) split of every token into two tokens, ordered by the rank of the token
    they make, then of left and right: the merges that make `tokenizers` BPE behave as tiktoken's."""
    merges = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def tokenizer_json(tok):
    """tokenizer.json (a dict) of our Tokenizer for the `tokenizers` library."""
    specials = [{"id": tok.special_ids[s], "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True} for s in SPECIAL_TOKENS]
    bos = {"SpecialToken": {"id": BOS, "type_id": 0}}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": specials,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tok.pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ]},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {BOS: {"id": BOS, "ids": [tok.bos_token_id], "tokens": [BOS]}},
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
            "vocab": {_text(token): rank for token, rank in sorted(tok.mergeable_ranks.items(), key=lambda kv: kv[1])},
            "merges": [[_text(left), _text(right)] for left, right in _splits(tok.mergeable_ranks)],
        },
    }


def tokenizer_config(sequence_len):
    """tokenizer_config.json (a dict): the fast tokenizer class over tokenizer.json, its special
    tokens, and no clean-up of spaces on decode (it would rewrite " ." and the like)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": None,
        "model_max_length": sequence_len,
        "clean_up_tokenization_spaces": False,
    }


def _bytes(text, where):
    try:
        return bytes(UNICODE_TO_BYTE[c] for c in text)
    except KeyError as e:
        raise TokenizerFileError(f"tokenizer.json: {where} {text!r} has {e.args[0]!r}, not a byte-level character") from None


def _check_pipeline(data):
    """The split pattern of a byte-level BPE tokenizer.json like ours, or TokenizerFileError."""
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix"):
        raise TokenizerFileError(f"tokenizer.json: model {model.get('type')!r}: expected a plain byte-level BPE")
    if not model.get("ignore_merges"):
        raise TokenizerFileError("tokenizer.json: model.ignore_merges must be true (tiktoken takes a piece "
                                 "that is a token whole)")
    if data.get("normalizer"):
        raise TokenizerFileError(f"tokenizer.json: normalizer {data['normalizer'].get('type')!r}: expected none")
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if (len(steps) != 2 or steps[0].get("type") != "Split" or "Regex" not in (steps[0].get("pattern") or {})
            or steps[0].get("behavior") != "Isolated" or steps[0].get("invert")
            or steps[1].get("type") != "ByteLevel" or steps[1].get("use_regex") or steps[1].get("add_prefix_space")):
        raise TokenizerFileError("tokenizer.json: pre_tokenizer must be Split(Regex, Isolated) then "
                                 "ByteLevel(add_prefix_space=false, use_regex=false)")
    if (data.get("decoder") or {}).get("type") != "ByteLevel":
        raise TokenizerFileError("tokenizer.json: decoder must be ByteLevel")
    return steps[0]["pattern"]["Regex"]


def from_tokenizer_json(data):
    """Our Tokenizer of a tokenizer.json (the parsed dict, as `tokenizer_json` writes it, or as
    transformers' tiktoken conversion writes upstream nanochat's), or TokenizerFileError naming the
    field. Requires: a byte-level BPE (pre-tokenizer Split(Regex) then ByteLevel, ignore_merges);
    vocabulary ids exactly 0..n-1 including all 256 single bytes; added tokens exactly our
    SPECIAL_TOKENS at ids n..n+8; merges that are every two-token split of every token, ordered by
    the rank of the token made (else its encoding could differ from tiktoken's on the same ranks).
    The result encodes as the file's tokenizer does (see the module docstring for the one rare
    exception) and renders chats with our special tokens; the split pattern is the file's."""
    if not isinstance(data, dict):
        raise TokenizerFileError(f"tokenizer.json: expected a JSON object, got {type(data).__name__}")
    pattern = _check_pipeline(data)
    vocab = data["model"].get("vocab") or {}
    added = {t.get("content"): t.get("id") for t in data.get("added_tokens") or []}
    ranks = {_bytes(text, "vocab token"): rank for text, rank in vocab.items() if text not in added}
    n = len(ranks)
    if sorted(ranks.values()) != list(range(n)):
        raise TokenizerFileError(f"tokenizer.json: model.vocab ids are not exactly 0..{n - 1} (gaps, duplicates, or specials inside)")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerFileError(f"tokenizer.json: model.vocab lacks single-byte tokens for bytes {missing[:8]}")
    expected = {s: n + i for i, s in enumerate(SPECIAL_TOKENS)}
    if added != expected or any(vocab.get(s, expected[s]) != expected[s] for s in SPECIAL_TOKENS):
        raise TokenizerFileError(f"tokenizer.json: added_tokens {added} are not nanochat's special tokens at ids {n}..{n + 8}")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["model"].get("merges") or []]
    ours = [(_text(left), _text(right)) for left, right in _splits(ranks)]
    if set(merges) != set(ours) or len(merges) != len(ours) or not _ordered_by_rank(merges, ranks):
        raise TokenizerFileError("tokenizer.json: model.merges are not every two-token split of every token in rank order: "
                                 "not a tiktoken-style BPE, so our encoding of the same ranks would differ")
    return Tokenizer(ranks, pattern)


def _ordered_by_rank(merges, ranks):
    made = [ranks[_bytes(left + right, "merge")] for left, right in merges]
    return all(a <= b for a, b in zip(made, made[1:]))

