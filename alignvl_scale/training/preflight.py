"""Everything a launch can check before any process group exists, once, on every rank:
a typo fails in a second with its key or file named, not after the engines start (or
after training, for an eval set).

    cfg = load_config(path, overrides)
    prepared = preflight(cfg, resume="latest")  # -> the completed config, the launch, the resume plan
    Trainer(prepared).run()

What it checks: the launch's topology (against what `accelerate launch` declared), the
config completed for this world (feature manifest, per-rank batch from the global one),
eval sets and zero-shot sets (templates included), tower folders, the checkpoint --resume
names (that it holds this run's model, and whether it loads as saved or converted), the
data streams (the checkpoint's, or data.streams or its default: that this world divides
them) with the training shards and the batches an epoch gives, and the run folder (lock,
earlier run).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from alignvl_scale.checkpoint.plan import ResumePlan, plan_resume
from alignvl_scale.checkpoint.rundir import claim_run_dir
from alignvl_scale.config import ConfigError, RunConfig, counted, for_world, model_fingerprint
from alignvl_scale.data.reader import load_sources, streams_for
from alignvl_scale.data.shards import DataSourceError, Shard, manifest_of, resolve_spec
from alignvl_scale.data.streams import check_streams, dividing_worlds, epoch_deal, global_micro_batch
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
    sources: list[list[Shard]] | None = None  # data.train resolved (remote listings included): the reader's


def check_components(cfg: RunConfig) -> None:
    """What the config cannot check by itself, each by the component it concerns: the
    objective (its bias), the DeepSpeed JSON (found, and the same as an accelerate config's),
    the trackers (installed, and their settings)."""
    check_loss_config(cfg.loss)
    resolve_ds_config(cfg.engine)
    check_trackers(cfg.log)


def with_data_streams(cfg: RunConfig, world: int, plan: ResumePlan | None) -> tuple[RunConfig, list[list[Shard]]]:
    """The config with data.streams resolved: the checkpoint's (a run keeps its streams, and
    with them its batches), else data.streams or its default for this world; checked against
    this world, the batch and the data (an epoch of at least one optimizer step). A resume
    that sets another data.streams has the rest of its epoch re-dealt. With the sources it
    resolved (the reader takes them: a remote listing is read once per launch)."""
    saved = plan.data_streams if plan is not None else None
    fusemix = cfg.model.mixup == "fusemix"
    if saved is not None and cfg.data.streams is None and saved % world:
        worlds = ", ".join(map(str, dividing_worlds(saved)))
        raise ConfigError(f"data.streams: {plan.path.name}'s run reads its data through {saved} streams, which "
                          f"{counted(world, 'rank')} cannot share; resume on {worlds} "
                          f"ranks to continue with the same batches, or set data.streams to a count {world} divides "
                          "(the rest of the epoch is then re-dealt, in other batches)")
    sources = load_sources(cfg.data)
    streams = cfg.data.streams or saved or streams_for(cfg.data, world, even_share=fusemix)
    check_streams(streams, world, global_micro_batch(cfg.data.batch_size, world), fusemix)
    if cfg.data.mode == "epoch":
        per_epoch = epoch_deal(sources, streams, global_micro_batch(cfg.data.batch_size, world),
                               cfg.data.train_fraction).batches
        if per_epoch < cfg.train.accumulation:
            raise DataSourceError(f"train.accumulation={cfg.train.accumulation}: an epoch gives only {per_epoch} "
                                  f"micro-batches of data.batch_size={cfg.data.batch_size} per rank")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, streams=streams)), sources


def check_inputs(cfg: RunConfig) -> None:
    """Components, eval sets and towers of a completed config."""
    check_components(cfg)
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
    check_inputs(cfg)
    plan = plan_resume(cfg.run_dir, resume, launch.world, configured_stage(cfg.engine), model_fingerprint(cfg),
                       deep=launch.is_first) if resume else None
    cfg, sources = with_data_streams(cfg, launch.world, plan)
    if launch.is_first:
        claim_run_dir(cfg.run_dir, resume, overwrite)
    export_torch_env(launch)
    return Prepared(cfg, launch, plan, trust_checkpoint, sources)
