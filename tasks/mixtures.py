"""Tasks composed of tasks: a concatenation (TaskSequence) and a weighted, shuffled mixture
(TaskMixture), both Tasks themselves (sliceable, lazily sized). Sub-tasks are used through their own
views (`len(task)`, `task[i]`), so a sliced or shuffled task mixes as it is."""

import bisect
import random
from functools import cached_property

from tasks.common import Task


class TaskSequence(Task):
    """The examples of each task in turn."""

    def __init__(self, tasks, **kwargs):
        assert tasks, "a TaskSequence needs at least one task"
        super().__init__(**kwargs)
        self.tasks = list(tasks)

    @cached_property
    def offsets(self):
        """offsets[k] = index of task k's first example; offsets[-1] = total."""
        out = [0]
        for task in self.tasks:
            out.append(out[-1] + len(task))
        return out

    @property
    def eval_type(self):
        types = {task.eval_type for task in self.tasks}
        return types.pop() if len(types) == 1 else None

    def num_examples(self):
        return self.offsets[-1]

    def locate(self, index):
        """(task number, index inside that task's view) of example `index`."""
        assert 0 <= index < self.num_examples(), f"index {index} out of range ({self.num_examples()} examples)"
        k = bisect.bisect_right(self.offsets, index) - 1
        return k, index - self.offsets[k]

    def get_example(self, index):
        k, i = self.locate(index)
        return self.tasks[k][i]

    def evaluate(self, conversation, completion):
        raise NotImplementedError("evaluate each task on its own: a conversation does not say which task it came from")


class TaskMixture(TaskSequence):
    """The tasks' examples interleaved in a fixed pseudo-random order (`seed`). `weights[k]` is task k's
    epochs in the mixture, the passes over it: 2 = every example twice, 0.5 = a fixed random half,
    1 (the default) = each once (listing a task twice is the same as weight 2, as upstream lists one
    per epoch)."""

    def __init__(self, tasks, weights=None, seed=42, **kwargs):
        tasks = list(tasks)
        weights = [1] * len(tasks) if weights is None else list(weights)
        assert len(weights) == len(tasks), f"{len(weights)} weights for {len(tasks)} tasks"
        assert all(isinstance(w, (int, float)) and w >= 0 for w in weights), f"weights must be numbers >= 0, got {weights}"
        assert seed is not None, "a TaskMixture is always shuffled: seed must be an int"
        super().__init__(tasks, seed=seed, **kwargs)
        self.weights = weights

    @cached_property
    def offsets(self):
        out = [0]
        for task, w in zip(self.tasks, self.weights):
            out.append(out[-1] + round(w * len(task)))
        return out

    @cached_property
    def partial_epochs(self):
        """For each task, the indices of the last, partial pass: a seeded sample, in order."""
        samples = []
        for k, task in enumerate(self.tasks):
            n, count = len(task), self.offsets[k + 1] - self.offsets[k]
            rng = random.Random(f"mixture/{self.seed}/{k}")
            samples.append(sorted(rng.sample(range(n), count % n)) if n else [])
        return samples

    def get_example(self, index):
        k, i = self.locate(index)
        n = len(self.tasks[k])
        full = (self.offsets[k + 1] - self.offsets[k]) // n * n
        return self.tasks[k][i % n if i < full else self.partial_epochs[k][i - full]]
