"""GSM8K: grade-school math word problems with worked solutions (https://huggingface.co/datasets/openai/gsm8k).

Solutions mark each calculation `<<48/2=24>>` and end with `#### 72`. Each mark becomes a python tool
call (the expression) and its output (the result), so the model learns to use the calculator:

    "Natalia sold 48/2 = <<48/2=24>>24 clips" ->
    [text "Natalia sold 48/2 = ", python "48/2", python_output "24", text "24 clips"]

The `#### N` line stays in the text: it is the answer format that `evaluate` reads.
"""

import re

from tasks.common import FileTask, assistant_text, final_answer, parse_number, read_parquet, require_str

SUBSETS = ("main", "socratic")
SPLITS = ("train", "test")
MARK_RE = re.compile(r"<<([^<>]*)>>")


def answer_parts(answer):
    """Assistant content parts for a GSM8K solution; joining text parts and `<<python=output>>`
    gives the solution back."""
    parts, pos = [], 0
    for m in MARK_RE.finditer(answer):
        expr, eq, result = m.group(1).rpartition("=")
        if not eq:
            raise ValueError(f"calculator mark {m.group(0)!r} has no '=result'")
        if m.start() > pos:
            parts.append({"type": "text", "text": answer[pos:m.start()]})
        parts.append({"type": "python", "text": expr})
        parts.append({"type": "python_output", "text": result})
        pos = m.end()
    if pos < len(answer):
        parts.append({"type": "text", "text": answer[pos:]})
    return parts


class GSM8K(FileTask):
    eval_type = "generative"

    def __init__(self, split="train", subset="main", **kwargs):
        assert subset in SUBSETS, f"GSM8K subset must be one of {SUBSETS}, got {subset!r}"
        assert split in SPLITS, f"GSM8K split must be one of {SPLITS}, got {split!r}"
        super().__init__(f"hf/openai/gsm8k/{subset}/{split}-00000-of-00001.parquet", **kwargs)
        self.split = split

    def read(self, uri):
        return read_parquet(uri, ["question", "answer"])

    def parse(self, row):
        require_str(row, "question", "answer")
        if parse_number(final_answer(row["answer"])) is None:
            raise ValueError(f"answer does not end with '#### <number>': {row['answer'][-80:]!r}")
        if row["answer"].count("<<") != row["answer"].count(">>"):
            raise ValueError("unbalanced calculator marks '<<' / '>>'")
        answer_parts(row["answer"])
        return (row["question"], row["answer"])

    def get_example(self, index):
        question, answer = self.rows[index]
        return {
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer_parts(answer)},
            ]
        }

    def evaluate(self, conversation, completion):
        """Whether the number after the first `####` of the completion equals the reference's
        (commas and "$" ignored; 18 == 18.00). `reward` (RL) is this as 1.0 / 0.0."""
        assert isinstance(completion, str), f"completion must be a str, got {type(completion).__name__}"
        reference = parse_number(final_answer(assistant_text(conversation)))
        assert reference is not None, "the reference conversation has no '#### <number>' answer"
        return parse_number(final_answer(completion)) == reference
