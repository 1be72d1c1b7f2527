"""The built wheel works without the source tree: its DeepSpeed JSONs and example configs
are package data, found by name, and a tiny training runs from it in a foreign folder."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import borrowing_venv, make_tiny_towers, write_image_shards

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_its_configs_and_trains_outside_the_source_tree(tmp_path):
    # Built from a copy of the tracked files: an in-tree build would leave build/ in the
    # checkout, whose stale modules a later wheel could pick up.
    source = tmp_path / "source"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / name).is_symlink():
            target.symlink_to(os.readlink(ROOT / name))
        else:
            shutil.copy2(ROOT / name, target)
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(source)], check=True, capture_output=True, timeout=300)
    wheel = next(dist.glob("alignvl_scale-*.whl"))
    # A fresh venv holding the wheel: alignvl_scale can only come from the wheel.
    python, site = borrowing_venv(tmp_path / "venv")
    venv = python.parents[1]
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    shipped = {p.relative_to(site / "alignvl_scale").as_posix() for p in (site / "alignvl_scale").rglob("*")
               if p.suffix in (".json", ".yaml")}
    assert {"ds_configs/zero1.json", "ds_configs/zero2.json", "ds_configs/zero3.json",
            "ds_configs/zero3_offload.json", "configs/demo.yaml"} <= shipped

    towers = make_tiny_towers(tmp_path / "towers")
    write_image_shards(tmp_path / "train", [16] * 2)
    foreign = tmp_path / "elsewhere"
    foreign.mkdir()
    config = foreign / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"image_tower": {"name": towers["vit"], "pooling": "mean"},
                  "text_tower": {"name": towers["bert"], "max_length": 16}, "embed_dim": 16},
        "data": {"train": [str(tmp_path / "train")], "batch_size": 4, "workers": 1, "image_size": 16},
        "train": {"steps": 4, "log_every": 2}, "engine": {"ds_config": "zero1"}, "run_dir": str(foreign / "run")}))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PATH=f"{venv / 'bin'}:{env.get('PATH', '')}")
    where = subprocess.run([str(python), "-c", "import alignvl_scale, alignvl_scale.studies.demo as d; "
                            "print(alignvl_scale.__file__); print(d.DEMO_CONFIG.is_file())"],
                           cwd=foreign, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.split() == [str(site / "alignvl_scale" / "__init__.py"), "True"]
    proc = subprocess.run([str(python), "-m", "alignvl_scale.cli", "train", "--config", str(config)],
                          cwd=foreign, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "ZeRO stage 1" in proc.stdout
    assert json.loads((foreign / "run" / "summary.json").read_text())["step"] == 4
