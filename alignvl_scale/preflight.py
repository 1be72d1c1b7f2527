"""Everything a launch can check before any process group exists, once, on every rank:
a typo fails in a second with its key or file named, not after the engines start (or
after training, for an eval set).

    cfg = load_config(path, overrides)
    prepared = preflight(cfg, resume="latest")  # -> the completed config, the launch, the resume plan
    Trainer(prepared).run()

What it checks: the launch's topology (against what `accelerate launch` declared), the
config completed for this world (feature manifest, per-rank batch from the global one),
training shards and their manifests, the batches an epoch gives each rank, eval sets and
zero-shot sets (templates included), tower folders, the run folder (lock, earlier run),
and the checkpoint --resume names (and whether it loads as saved or converted).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from alignvl_scale.checkpoint import ResumePlan, plan_resume
from alignvl_scale.config import ConfigError, RunConfig, for_world
from alignvl_scale.data.reader import batches_per_epoch, load_sources
from alignvl_scale.data.shards import DataSourceError, resolve_spec
from alignvl_scale.engine import zero_stage
from alignvl_scale.launch import LaunchEnv, accelerate_declaration, check_declared_world, export_torch_env, launch_env
from alignvl_scale.model import with_feature_manifest
from alignvl_scale.rundir import claim_run_dir
from alignvl_scale.towers import check_tower_source
from alignvl_scale.zeroshot import zero_shot_layout


@dataclass(frozen=True)
class Prepared:
    cfg: RunConfig  # completed: feature manifest read, data.batch_size for this world
    launch: LaunchEnv
    resume: ResumePlan | None = None
    trust_checkpoint: bool = False


def check_trackers(cfg: RunConfig, environ: dict | None = None) -> None:
    """A tracker's own settings that would fail only after launch. MLflow: its file store
    (a file: URI, a bare path, or no MLFLOW_TRACKING_URI at all, which means ./mlruns) is in
    maintenance mode and raises when a run starts; its SQLite store needs SQLAlchemy and Alembic."""
    import importlib.util
    import os

    environ = os.environ if environ is None else environ
    if "mlflow" not in cfg.log.report_to:
        return
    uri = environ.get("MLFLOW_TRACKING_URI", "")
    allowed = environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("1", "true", "yes")
    if (uri.startswith("file:") or "://" not in uri and not uri.startswith("sqlite:")) and not allowed:
        raise ConfigError(f"log.report_to: mlflow with MLFLOW_TRACKING_URI={uri or '(unset: ./mlruns)'} uses MLflow's "
                          "file store, which refuses new runs (maintenance mode); set MLFLOW_TRACKING_URI=sqlite:///"
                          "PATH/mlflow.db (or a tracking server's http:// address), or MLFLOW_ALLOW_FILE_STORE=true")
    missing = [m for m in ("sqlalchemy", "alembic") if importlib.util.find_spec(m) is None]
    if uri.startswith("sqlite:") and missing:
        raise ConfigError(f"log.report_to: MLflow's SQLite store ({uri}) needs {' and '.join(missing)}: "
                          "pip install -e '.[track]'")


def check_inputs(cfg: RunConfig, world: int) -> None:
    """Data, eval sets, trackers and towers of a completed config, for `world` ranks."""
    check_trackers(cfg)
    sources = load_sources(cfg.data)
    if cfg.data.mode == "epoch":
        per_epoch = batches_per_epoch(sources, world, cfg.data.workers, cfg.data.batch_size, cfg.seed,
                                      train_fraction=cfg.data.train_fraction)
        if per_epoch < cfg.train.accumulation:
            raise DataSourceError(f"train.accumulation={cfg.train.accumulation}: an epoch gives each rank only "
                                  f"{per_epoch} batches of data.batch_size={cfg.data.batch_size}")
    for spec in cfg.eval.data:
        if Path(spec).suffix.lower() == ".jsonl":
            if not Path(spec).is_file():
                raise DataSourceError(f"eval.data: {spec} is not a file")
        else:
            resolve_spec(spec)
    for folder in cfg.eval.zero_shot:
        zero_shot_layout(folder)  # folders, class and template files (its images are read at the first eval)
    if cfg.data.kind != "features":
        for modality in ("image", "text"):
            check_tower_source(getattr(cfg.model, f"{modality}_tower"), f"model.{modality}_tower")


def preflight(cfg: RunConfig, resume: str | None = None, overwrite: bool = False,
              trust_checkpoint: bool = False, launch: LaunchEnv | None = None) -> Prepared:
    """Check a validated config for this launch and complete it; claim the run folder (the
    launch's rank 0); plan the resume. Raises the project's user errors (ConfigError,
    DataSourceError, RunDirError, CheckpointError, LaunchError)."""
    launch = launch or launch_env()
    check_declared_world(launch, accelerate_declaration())
    cfg = for_world(with_feature_manifest(cfg), launch.world)
    check_inputs(cfg, launch.world)
    if launch.is_first:
        claim_run_dir(cfg.run_dir, resume, overwrite)
    stage = zero_stage(json.loads(cfg.engine.resolved_ds_config().read_text()))
    plan = plan_resume(cfg.run_dir, resume, launch.world, stage, deep=launch.is_first) if resume else None
    export_torch_env(launch)
    return Prepared(cfg, launch, plan, trust_checkpoint)
