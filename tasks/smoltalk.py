"""SmolTalk: general chat conversations for SFT (https://huggingface.co/datasets/HuggingFaceTB/smol-smoltalk).

Rows `messages` (a list of {role, content}: an optional system message, then user/assistant
alternating, assistant last) and `source`. Conversations are used as they are; with `max_chars`,
those longer than that many characters (all messages together) are left out.
"""

import copy

from tasks.common import FileTask, check_conversation, read_parquet

SPLITS = ("train", "test")


class SmolTalk(FileTask):
    eval_type = "generative"

    def __init__(self, split="train", max_chars=None, **kwargs):
        assert split in SPLITS, f"SmolTalk split must be one of {SPLITS}, got {split!r}"
        super().__init__(f"hf/HuggingFaceTB/smol-smoltalk/data/{split}-00000-of-00001.parquet", **kwargs)
        self.split, self.max_chars = split, max_chars

    def read(self, uri):
        return read_parquet(uri, ["messages"])

    def parse(self, row):
        messages = check_conversation(row["messages"])
        if self.max_chars is not None and sum(len(m["content"]) for m in messages) > self.max_chars:
            return None
        return messages

    def get_example(self, index):
        return {"messages": copy.deepcopy(self.rows[index])}

    def evaluate(self, conversation, completion):
        raise NotImplementedError("SmolTalk is training data: it has no automatic evaluation")
