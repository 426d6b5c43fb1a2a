"""HumanEval: 164 Python functions to complete from a signature and docstring, checked by unit tests
(https://huggingface.co/datasets/openai/openai_humaneval).

The user message is the prompt (imports, signature, docstring); the reference assistant message is
the prompt followed by the canonical body. `evaluate` runs the generated code and the tests in
nanochat's sandbox (`nanochat.execution.execute`).
"""

import re

from nanochat.execution import execute
from tasks.common import FileTask, read_parquet, require_str

FENCE_RE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.S | re.I)
TIMEOUT = 5.0  # seconds for one program (the tests of one problem)


def extract_code(completion):
    """The code in a completion: the first ```python fenced block (an unclosed fence runs to the
    end), else the whole text."""
    m = FENCE_RE.search(completion)
    return m.group(1) if m else completion


def build_program(conversation, completion):
    """A program that defines the function from `completion` and runs the problem's tests. A completion
    that does not define the function is taken as a continuation of the prompt (just the body)."""
    code = extract_code(completion)
    prompt, entry_point = conversation["messages"][0]["content"], conversation["entry_point"]
    if not re.search(rf"^\s*(async\s+)?def\s+{re.escape(entry_point)}\s*\(", code, re.M):
        code = prompt + code
    else:  # keep the prompt's imports (typing, math, ...) the model may have left out
        imports = [line for line in prompt.splitlines() if line.startswith(("import ", "from "))]
        code = "\n".join(imports) + "\n\n" + code
    return f"{code}\n\n{conversation['test']}\n\ncheck({entry_point})\n"


class HumanEval(FileTask):
    eval_type = "generative"

    def __init__(self, **kwargs):
        super().__init__("hf/openai/openai_humaneval/openai_humaneval/test-00000-of-00001.parquet", **kwargs)

    def read(self, uri):
        return read_parquet(uri, ["task_id", "prompt", "canonical_solution", "test", "entry_point"])

    def parse(self, row):
        require_str(row, "task_id", "prompt", "canonical_solution", "test", "entry_point")
        if f"def {row['entry_point']}" not in row["prompt"]:
            raise ValueError(f"prompt does not define the entry point {row['entry_point']!r}")
        return row

    def get_example(self, index):
        row = self.rows[index]
        return {
            "messages": [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row["prompt"] + row["canonical_solution"]},
            ],
            "task_id": row["task_id"],
            "entry_point": row["entry_point"],
            "test": row["test"],
        }

    def evaluate(self, conversation, completion, timeout=TIMEOUT):
        """Whether the program passes the problem's tests in the sandbox within `timeout` seconds."""
        return bool(execute(build_program(conversation, completion), timeout=timeout).success)
