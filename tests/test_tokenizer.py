"""The runtime tokenizer: training, persistence, encoding oracles and chat rendering."""

import pytest

import rustbpe
from nanochat import shards, storage
from nanochat.tokenizer import SPECIAL_TOKENS, ConversationError, Tokenizer

VOCAB = 1024


@pytest.fixture(scope="module")
def corpus(shared_data):
    shard = shards.list_shards(storage.normalize(str(shared_data / "pretrain")))[0]
    return list(shards.iter_texts([shard], max_chars=1_500_000))


@pytest.fixture(scope="module")
def tok(corpus):
    return Tokenizer.train(iter(corpus), VOCAB)


def test_vocab_layout(tok):
    assert tok.vocab_size == VOCAB
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(VOCAB - len(SPECIAL_TOKENS), VOCAB))
    assert tok.bos_token_id == VOCAB - len(SPECIAL_TOKENS)
    lengths = tok.token_byte_lengths()
    assert lengths[:256] == [1] * 256 and lengths[-len(SPECIAL_TOKENS):] == [0] * len(SPECIAL_TOKENS)
    assert all(n >= 2 for n in lengths[256:-len(SPECIAL_TOKENS)])


def test_tiktoken_runtime_matches_rustbpe_encoder(tok, corpus):
    """Two independent BPE encoders over the same ranks must agree token for token."""
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(iter(corpus), VOCAB - len(SPECIAL_TOKENS), pattern=tok.pattern)
    texts = corpus[-50:] + ["", " ", "hello  world\n\n", "naïve café 12345 ☃ 🙂", "x" * 1000]
    assert tok.encode(texts) == bpe.batch_encode(texts)


def test_roundtrip_and_batch(tok, corpus):
    texts = corpus[:20] + ["naïve café 12345 ☃ 🙂 \r\n\t", "<|bos|> is plain text here"]
    batch = tok.encode(texts, prepend="<|bos|>", num_threads=2)
    for text, ids in zip(texts, batch):
        assert ids[0] == tok.bos_token_id
        assert ids[1:] == tok.encode(text)
        assert tok.decode(ids[1:]) == text
    # special-token strings inside ordinary text are never special
    assert tok.bos_token_id not in tok.encode("<|bos|>")


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_save_load(tok, tmp_path, kind, request):
    root = storage.normalize(str(tmp_path)) if kind == "file" else request.getfixturevalue("s3_root")
    d = storage.join(root, "tok")
    out = tok.save(d)
    assert set(storage.listdir(d)) == {"ranks.tiktoken", "tokenizer.json"}
    assert out["tokenizer"].endswith("tokenizer.json")
    loaded = Tokenizer.load(d)
    assert loaded.mergeable_ranks == tok.mergeable_ranks
    assert loaded.encode("Hello there, 2024!") == tok.encode("Hello there, 2024!")


def test_load_rejects_bad_files(tok, tmp_path):
    d = storage.normalize(str(tmp_path / "tok"))
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.load(d)
    tok.save(d)
    ranks = tmp_path / "tok" / "ranks.tiktoken"
    ranks.write_bytes(ranks.read_bytes()[:-10])
    with pytest.raises(ValueError, match="sha256"):
        Tokenizer.load(d)
    meta = tmp_path / "tok" / "tokenizer.json"
    meta.write_text(meta.read_text().replace("nanochat-tokenizer/1", "pickle"))
    with pytest.raises(ValueError, match="unsupported format"):
        Tokenizer.load(d)


def test_parse_ranks_validation():
    from nanochat.tokenizer import parse_ranks

    good = b"".join(__import__("base64").b64encode(bytes([i])) + b" %d\n" % i for i in range(256))
    assert len(parse_ranks(good)) == 256
    with pytest.raises(ValueError, match="line 257"):
        parse_ranks(good + b"garbage\n")
    with pytest.raises(ValueError, match="0..255"):
        parse_ranks(good.replace(b" 255\n", b" 300\n"))


def segments(tok, ids, mask):
    """(decoded text, mask value) runs, for readable assertions."""
    out, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or mask[i] != mask[start]:
            out.append((tok.decode(ids[start:i]), mask[start]))
            start = i
    return out


def test_render_conversation_masks(tok):
    conversation = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 6*7?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute. "},
            {"type": "python", "text": "6*7"},
            {"type": "python_output", "text": "42"},
            {"type": "text", "text": "It is 42."},
        ]},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ]}
    ids, mask = tok.render_conversation(conversation)
    assert len(ids) == len(mask)
    assert segments(tok, ids, mask) == [
        ("<|bos|><|user_start|>Be brief.\n\nWhat is 6*7?<|user_end|><|assistant_start|>", 0),
        ("Let me compute. <|python_start|>6*7<|python_end|>", 1),
        ("<|output_start|>42<|output_end|>", 0),
        ("It is 42.<|assistant_end|>", 1),
        ("<|user_start|>Thanks<|user_end|><|assistant_start|>", 0),
        ("You're welcome.<|assistant_end|>", 1),
    ]
    short_ids, short_mask = tok.render_conversation(conversation, max_tokens=10)
    assert short_ids == ids[:10] and short_mask == mask[:10]


def test_render_for_completion(tok):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    prompt = tok.render_for_completion({"messages": messages})
    full, _ = tok.render_conversation({"messages": messages})
    assert prompt == full[: len(prompt)]
    assert prompt[-1] == tok.encode_special("<|assistant_start|>")
    assert tok.render_for_completion(messages[:1]) == prompt


def test_client_shapes_render_as_documented(tok):
    """What API clients send: system/developer messages fold into the next user turn, turns in a row
    from one role are joined, a final assistant message is continued on request (prefill)."""
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "user", "content": "there"}, {"role": "assistant", "content": "Hello."},
                {"role": "assistant", "content": "Yes?"}, {"role": "system", "content": "French."},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Au"}]
    expected = ("<|bos|><|user_start|>Be brief.\n\nHi\n\nthere<|user_end|><|assistant_start|>Hello.\n\nYes?<|assistant_end|>"
                "<|user_start|>French.\n\nBye<|user_end|><|assistant_start|>")
    assert tok.decode(tok.render_for_completion(messages)) == expected
    assert tok.decode(tok.render_for_completion(messages, continue_final_message=True)) == expected + "Au"
    with pytest.raises(ConversationError, match="followed by a user message"):
        tok.render_for_completion([*messages[:4], {"role": "system", "content": "late"}])
    with pytest.raises(ConversationError, match="message 1"):  # training data stays strict
        tok.render_conversation(messages[1:4])


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty"),
    ([{"role": "assistant", "content": "hi"}], "expected 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1"),
    ([{"role": "user", "content": "a"}], "end with an assistant"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "bash", "text": "ls"}]}], "part 0"),
    ([{"role": "user"}], "message 0"),
])
def test_render_rejects_bad_conversations(tok, messages, match):
    with pytest.raises(ConversationError, match=match):
        tok.render_conversation({"messages": messages})
