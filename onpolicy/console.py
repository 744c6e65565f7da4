"""What reaches the console: onpolicy's own lines, not its libraries' chatter.

By default Ray's start-up and auth notices, vLLM's, transformers' and `datasets`' log lines and progress
bars, and library warnings are quieted (set before those libraries are imported, since most read their level
at import). `ONPOLICY_DEBUG=1` or `onpolicy --verbose` shows everything (and tracebacks for errors).
"""

from __future__ import annotations

import logging
import os
import warnings

THIRD_PARTY = ("ray", "vllm", "transformers", "torch", "httpx", "urllib3", "filelock", "huggingface_hub", "datasets")


def debug() -> bool:
    return os.environ.get("ONPOLICY_DEBUG") == "1"


def quiet_third_party() -> None:
    """Quiet the libraries unless debugging (safe to call twice)."""
    if debug():
        return
    # `datasets` draws its own bars ("Generating train split") whatever the hub's setting; it reads this at import.
    for key, value in {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                       "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "VLLM_LOGGING_LEVEL": "ERROR",
                       "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(key, value)
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"(torch|transformers|ray|vllm|huggingface_hub|peft)(\.|$)")


def ray_logging_level() -> int:
    """The level Ray's own logger gets in `ray.init` (its notices are INFO/WARNING)."""
    return logging.INFO if debug() else logging.ERROR
