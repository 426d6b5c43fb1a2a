"""transformers for the interop tests, imported offline: never the hub, its dynamic-module copies
in a temp dir (transformers reads these variables when it is imported). None when not installed:
the tests then call stagerun.missing()."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="nanochat-test-hf-"))
os.environ.setdefault("HF_MODULES_CACHE", os.path.join(os.environ["HF_HOME"], "modules"))
try:
    import transformers
except ImportError:
    transformers = None
