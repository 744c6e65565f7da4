"""Build the chat example (data set, tokenizer, Qwen2 teacher and student), then distill with
`onpolicy train configs/chat-lora.yaml`. No downloads: everything is generated and trained here.

    .venv/bin/python scripts/build_chat_example.py            # ~5 minutes of CPU the first time
    .venv/bin/python scripts/build_chat_example.py --small    # a tiny pair in seconds (tests, smoke runs)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing


def main(argv: list[str] | None = None) -> int:
    from onpolicy.chat_example.build import DATA_DIR, FULL, MODELS_DIR, SMALL

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help=f"writes OUT/teacher and OUT/student (default {MODELS_DIR}; "
                   f"with --small, {MODELS_DIR}/small)")
    p.add_argument("--data-dir", default=None, help=f"writes DATA_DIR/train.parquet and test.parquet (default "
                   f"{DATA_DIR}; with --small, {MODELS_DIR}/small/data, so the committed data stays as it is)")
    p.add_argument("--small", action="store_true", help="tiny data set and models, built in seconds")
    p.add_argument("--force", action="store_true", help="retrain even when a matching build exists")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the example trains in minutes on a shared machine)")
    args = p.parse_args(argv)

    import torch

    from onpolicy.chat_example.build import build_chat_example

    torch.set_num_threads(args.threads)
    small_dir = MODELS_DIR / "small"
    out = args.out or (small_dir if args.small else MODELS_DIR)
    data_dir = args.data_dir or (small_dir / "data" if args.small else DATA_DIR)
    built = build_chat_example(out, data_dir, spec=SMALL if args.small else FULL, force=args.force)
    for name, info in built.items():
        print(f"{name}: {info['params'] / 1e6:.2f}M params, held-out exact match {info['heldout_accuracy']:.3f}")
    print("next: .venv/bin/onpolicy train configs/chat-lora.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
