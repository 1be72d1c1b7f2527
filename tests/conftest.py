import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests/distributed.py for spawned ranks
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from alignvl_scale.synthetic import make_tiny_towers, png_bytes, write_image_shards  # noqa: E402,F401
