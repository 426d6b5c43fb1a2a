"""SmolTalk: general chat conversations for SFT (https://huggingface.co/datasets/HuggingFaceTB/smol-smoltalk).

Rows `messages` (a list of {role, content}: an optional system message, then user/assistant
alternating, assistant last) and `source`. Conversations are used as they are.
"""

import copy

from tasks.common import FileTask, check_conversation, read_parquet

SPLITS = ("train", "test")


class SmolTalk(FileTask):
    eval_type = "generative"

    def __init__(self, split="train", **kwargs):
        assert split in SPLITS, f"SmolTalk split must be one of {SPLITS}, got {split!r}"
        super().__init__(f"hf/HuggingFaceTB/smol-smoltalk/data/{split}-00000-of-00001.parquet", **kwargs)
        self.split = split

    def read(self, uri):
        return read_parquet(uri, ["messages"])

    def parse(self, row):
        return check_conversation(row["messages"])

    def get_example(self, index):
        return {"messages": copy.deepcopy(self.rows[index])}

    def evaluate(self, conversation, completion):
        raise NotImplementedError("SmolTalk is training data: it has no automatic evaluation")
