"""Entry point for `ray job submit`: the same options as `cosed generate`, always on Ray.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python ray_jobs/generate.py --profile sd21-svd --tasks s3://bucket/tasks.jsonl --out s3://bucket/run1
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cosed.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["generate", *[a for a in sys.argv[1:] if a != "--no-ray"]]))
