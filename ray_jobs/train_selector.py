"""Entry point for `ray job submit`: `cosed train-selector` with embeddings and renders on Ray actors.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python ray_jobs/train_selector.py --tasks s3://bucket/tasks.jsonl --out s3://bucket/selector --generate-missing
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cosed.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train-selector", *[a for a in sys.argv[1:] if a != "--no-ray"]]))
