"""ARC (AI2 Reasoning Challenge), Easy or Challenge: grade-school science multiple choice.

https://huggingface.co/datasets/allenai/ai2_arc; rows `id, question, choices{text[], label[]}, answerKey`.
A few rows of the full dataset label their options 1-5 instead of A-E; those become letters.
"""

from tasks.common import FileTask, evaluate_mc, mc_conversation, read_parquet, require_str

SUBSETS = ("ARC-Easy", "ARC-Challenge")
SPLITS = ("train", "validation", "test")


class ARC(FileTask):
    eval_type = "categorical"

    def __init__(self, subset="ARC-Easy", split="test", **kwargs):
        assert subset in SUBSETS, f"ARC subset must be one of {SUBSETS}, got {subset!r}"
        assert split in SPLITS, f"ARC split must be one of {SPLITS}, got {split!r}"
        super().__init__(f"hf/allenai/ai2_arc/{subset}/{split}-00000-of-00001.parquet", **kwargs)
        self.subset, self.split = subset, split

    def read(self, uri):
        return read_parquet(uri, ["id", "question", "choices", "answerKey"])

    def parse(self, row):
        require_str(row, "question", "answerKey")
        choices = row["choices"] or {}
        texts, labels = choices.get("text"), choices.get("label")
        if not texts or not labels or len(texts) != len(labels) or len(texts) > 10:
            raise ValueError(f"choices must hold 1-10 texts with as many labels, got {choices!r:.120}")
        if any(not isinstance(t, str) for t in texts):
            raise ValueError(f"choice texts must be strings, got {texts!r:.120}")
        if row["answerKey"] not in labels:
            raise ValueError(f"answerKey {row['answerKey']!r} is not one of the labels {labels}")
        return (row["id"], row["question"], texts, labels.index(row["answerKey"]))

    def get_example(self, index):
        id_, question, choices, answer = self.rows[index]
        return mc_conversation(question, choices, answer, id=id_)

    def evaluate(self, conversation, completion):
        return evaluate_mc(conversation, completion)
