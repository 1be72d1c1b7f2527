"""The offline benchmarks by name: real pretrained towers and real data from PyPI (emoji,
studies/emoji.py) or Debian (Openclipart's public-domain clip art, studies/openclipart.py). The
pipeline that runs them is studies/demo.py.

A benchmark is a module with `build(shards_dir, source)` (writes shards_dir/train and
shards_dir/test image-text shards and shards_dir/zeroshot_<task> folders, returns counts with
"train" and "test"; source: where its raw data is, None for the default), `ZERO_SHOT_TASKS` and
`UNIT` (what one image is, in messages). It is imported when a run uses it: this registry stays
cheap to read for the command line.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from alignvl_scale.config import CONFIGS

DEMO_CONFIG = CONFIGS / "demo.yaml"  # the demo's towers and training, and the studies' base
STUDIES = CONFIGS / "studies"  # the shipped study files (studies/ablate.py)


@dataclass(frozen=True)
class Benchmark:
    name: str
    module: str
    default_dir: Path

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


BENCHMARKS = {b.name: b for b in (Benchmark("emoji", "alignvl_scale.studies.emoji", Path("runs/demo")),
                                  Benchmark("openclipart", "alignvl_scale.studies.openclipart",
                                            Path("runs/openclipart")))}


def demo_overrides(out: Path) -> list[str]:
    """A run on the benchmark data under OUT: its features and its run folder."""
    return [f"data.train=[{out / 'features' / 'train'}]", f"eval.data=[{out / 'features' / 'test'}]",
            f"run_dir={out / 'run'}"]
