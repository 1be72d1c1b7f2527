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
and the checkpoint --resume names (that it holds this run's model, and whether it loads as
saved or converted).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alignvl_scale.checkpoint.plan import ResumePlan, plan_resume
from alignvl_scale.checkpoint.rundir import claim_run_dir
from alignvl_scale.config import ConfigError, RunConfig, for_world, model_fingerprint
from alignvl_scale.data.reader import batches_per_epoch, load_sources
from alignvl_scale.data.shards import DataSourceError, manifest_of, resolve_spec
from alignvl_scale.evaluation.zeroshot import zero_shot_layout
from alignvl_scale.losses.registry import check_loss_config
from alignvl_scale.model.head import with_feature_manifest
from alignvl_scale.model.towers import check_tower_source
from alignvl_scale.training.engine import configured_stage, resolve_ds_config
from alignvl_scale.training.launch import (
    LaunchEnv,
    accelerate_declaration,
    check_declared_world,
    export_torch_env,
    launch_env,
)
from alignvl_scale.training.logger import check_trackers


@dataclass(frozen=True)
class Prepared:
    cfg: RunConfig  # completed: feature manifest read, data.batch_size for this world
    launch: LaunchEnv
    resume: ResumePlan | None = None
    trust_checkpoint: bool = False


def check_components(cfg: RunConfig) -> None:
    """What the config cannot check by itself, each by the component it concerns: the
    objective (its bias), the DeepSpeed JSON (found, and the same as an accelerate config's),
    the trackers (installed, and their settings)."""
    check_loss_config(cfg.loss)
    resolve_ds_config(cfg.engine)
    check_trackers(cfg.log)


def check_inputs(cfg: RunConfig, world: int) -> None:
    """Components, data, eval sets and towers of a completed config, for `world` ranks."""
    check_components(cfg)
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
            kind = "image-text"
        else:
            resolve_spec(spec)
            manifest = manifest_of(spec)  # none (pipe:, bare shards): the kind shows when it is read
            kind = manifest.get("kind", "image-text") if manifest else cfg.data.kind
        if kind != cfg.data.kind:  # the run's model encodes only what it trains on
            raise ConfigError(f"eval.data: {spec} holds {kind} samples, but data.kind is {cfg.data.kind}"
                              + (" (evaluate images with the checkpoint or its export: `alignvl-scale eval "
                                 "--checkpoint RUN/checkpoints/step_N --data SET`, or extract the set's features "
                                 "with `alignvl-scale extract`)" if cfg.data.kind == "features" else ""))
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
    plan = plan_resume(cfg.run_dir, resume, launch.world, configured_stage(cfg.engine), model_fingerprint(cfg),
                       deep=launch.is_first) if resume else None
    export_torch_env(launch)
    return Prepared(cfg, launch, plan, trust_checkpoint)
