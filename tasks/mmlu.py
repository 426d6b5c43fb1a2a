"""MMLU: 57 subjects of four-choice questions (https://huggingface.co/datasets/cais/mmlu).

Rows `question, subject, choices[4], answer (0-3)`; splits dev, validation and test of subset "all".
Split "auxiliary_train" (~100k rows, no subject) is the extra training set, stored upstream as its
own subset whose rows are wrapped in a `train` struct. Conversations carry `subject`.
"""

from tasks.common import FileTask, evaluate_mc, mc_conversation, read_parquet, require_str

SPLITS = ("dev", "validation", "test", "auxiliary_train")
COLUMNS = ["question", "subject", "choices", "answer"]


class MMLU(FileTask):
    eval_type = "categorical"

    def __init__(self, split="test", **kwargs):
        assert split in SPLITS, f"MMLU split must be one of {SPLITS}, got {split!r}"
        relpath = "auxiliary_train/train" if split == "auxiliary_train" else f"all/{split}"
        super().__init__(f"hf/cais/mmlu/{relpath}-00000-of-00001.parquet", **kwargs)
        self.split = split

    def read(self, uri):
        if self.split == "auxiliary_train":
            return [(where, row["train"] or {}) for where, row in read_parquet(uri, ["train"])]
        return read_parquet(uri, COLUMNS)

    def parse(self, row):
        require_str(row, "question")
        choices, answer = row.get("choices"), row.get("answer")
        if not isinstance(choices, list) or len(choices) != 4 or any(not isinstance(c, str) for c in choices):
            raise ValueError(f"choices must be 4 strings, got {choices!r:.120}")
        if not isinstance(answer, int) or not 0 <= answer < 4:
            raise ValueError(f"answer must be an int in 0-3, got {answer!r}")
        return (row["question"], choices, answer, row.get("subject") or "")

    def get_example(self, index):
        question, choices, answer, subject = self.rows[index]
        return mc_conversation(question, choices, answer, subject=subject)

    def evaluate(self, conversation, completion):
        return evaluate_mc(conversation, completion)
