"""Data mirrors made by tests for what ../shared/data lacks: a temporary folder laid out like it,
with copies of the shared eval bundle and task files (11 MB; an HTTP test server serves no link
leading outside its root), plus files written in their real sources' layout."""

import shutil

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat import sources


def task_mirror(shared_data, root, mmlu_questions=0):
    """`root` as a mirror of the eval bundle and the task files; with `mmlu_questions`, also MMLU's
    auxiliary_train as upstream stores it (each row wrapped in a `train` struct, no subject), its
    question i asking "Question i of the auxiliary set?" with answer i % 4. Returns root."""
    for relpath in sources.GROUPS["eval"] + sources.GROUPS["tasks"]:
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared_data / relpath, root / relpath)
    if mmlu_questions:
        path = root / sources.GROUPS["mmlu_train"][0]
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [{"question": f"Question {i} of the auxiliary set?", "subject": "", "answer": i % 4,
                 "choices": [f"choice {c} of {i}" for c in "abcd"]} for i in range(mmlu_questions)]
        pq.write_table(pa.table({"train": rows}), path)
    return root
