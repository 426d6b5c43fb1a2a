"""transformers for the interop tests, imported offline: never the hub, its dynamic-module copies
in a temp dir (transformers reads these variables when it is imported)."""

import os
import tempfile

import torch

from tests.support.stagerun import missing

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="nanochat-test-hf-"))
os.environ.setdefault("HF_MODULES_CACHE", os.path.join(os.environ["HF_HOME"], "modules"))
try:
    import transformers
except ImportError:
    transformers = None


def require_transformers():
    """transformers (a skip without it, a failure under CI)."""
    if transformers is None:
        missing("transformers is not installed (pip install -e '.[dev]')")
    return transformers


def randomize(model):
    """Draws every weight (from torch's generator: seed it before building the model) so that
    attention and MLP matter (our init zeros the output projections), the lm_head smaller so that
    greedy tokens are not near ties; returns the model in eval mode."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.05 if name == "lm_head.weight" else 0.1)
    return model.eval()
