"""Conversations from a JSONL file: one conversation per line, a JSON array of {role, content}
messages (or an object with "messages"). Defaults to nanochat's identity conversations, which teach
the model who it is."""

import copy

from tasks.common import FileTask, check_conversation, read_jsonl

IDENTITY = "identity_conversations.jsonl"


class CustomJSON(FileTask):
    eval_type = "generative"

    def __init__(self, path=None, **kwargs):
        """`path`: a local path or URI; None means the registry's identity conversations."""
        super().__init__(IDENTITY, path=path, **kwargs)

    def read(self, uri):
        return read_jsonl(uri)

    def parse(self, record):
        if isinstance(record, dict) and "messages" in record:
            record = record["messages"]
        return check_conversation(record)

    def get_example(self, index):
        return {"messages": copy.deepcopy(self.rows[index])}

    def evaluate(self, conversation, completion):
        raise NotImplementedError("CustomJSON conversations are training data: no automatic evaluation")
