"""log.report_to: trackers besides TensorBoard through Accelerate, checked offline with an
MLflow store in a temporary folder (the [track] extra), run config as parameters."""

import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from alignvl_scale.config import ConfigError, load_config
from alignvl_scale.data.synthetic import write_feature_shards


def test_mlflow_gets_the_run_config_and_every_logged_scalar(tmp_path):
    mlflow = pytest.importorskip("mlflow", reason="the [track] extra (CI installs it)")
    write_feature_shards(tmp_path / "train", 64, shards=2)
    run_dir = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"embed_dim": 16, "adapter": "linear"}, "loss": {"smoothing": 0.1},
        "data": {"kind": "features", "train": [str(tmp_path / "train")], "batch_size": 16, "workers": 0},
        "train": {"steps": 6, "lr": 0.01, "log_every": 2}, "log": {"report_to": ["tensorboard", "mlflow"],
                                                                 "project": "alignvl-test"},
        "run_dir": str(run_dir)}))
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"  # what docs/training.md says to use without a server
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_ALLOW_FILE_STORE", None)
    proc = subprocess.run([sys.executable, "-m", "alignvl_scale.cli", "train", "--config", str(config)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

    client = mlflow.tracking.MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("alignvl-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params["loss.smoothing"] == "0.1" and run.data.params["train.steps"] == "6"
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["train/loss"] for r in logged if "train/loss" in r}
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert history.keys() == losses.keys() == {2, 4, 6}
    assert all(abs(history[s] - losses[s]) < 1e-6 for s in losses)
    assert (run_dir / "tb").is_dir()  # TensorBoard too


@pytest.mark.parametrize("trackers,message", [
    (["tensorboard", "neptune"], r"log.report_to\[1\]: must be one of tensorboard, wandb, mlflow"),
    (["aim"], "aim is not installed \\(pip install aim"),
])
def test_unknown_or_missing_trackers_fail_before_launch(tmp_path, trackers, message):
    from alignvl_scale.training.preflight import check_components

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"steps": 1}, "log": {"report_to": trackers}}))
    with pytest.raises(ConfigError, match=message):
        check_components(load_config(path))


@pytest.mark.parametrize("uri,message", [
    ("", "MLFLOW_TRACKING_URI=(unset: ./mlruns) uses MLflow's file store"),
    ("file:///tmp/mlruns", "MLFLOW_TRACKING_URI=file:///tmp/mlruns uses MLflow's file store"),
    ("/tmp/mlruns", "uses MLflow's file store"),
])
def test_an_mlflow_store_that_refuses_runs_is_named_before_launch(tmp_path, uri, message):
    """The file store raised at the first logged run, after the process group and the engines
    were up; now the launch stops first, saying which store to use."""
    pytest.importorskip("mlflow", reason="the [track] extra (CI installs it)")
    from alignvl_scale.training.logger import check_trackers

    cfg = load_config(None, ["train.steps=1", "log.report_to=[mlflow]"]).log
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_trackers(cfg, {"MLFLOW_TRACKING_URI": uri} if uri else {})
    check_trackers(cfg, {"MLFLOW_TRACKING_URI": uri, "MLFLOW_ALLOW_FILE_STORE": "true"})  # the documented opt-out
    check_trackers(cfg, {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"})
