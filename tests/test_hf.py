"""The Hugging Face side of export (the folder itself is checked in test_train's export tests)."""


def test_push_to_hub_uploads_the_folder_it_was_given(tmp_path):
    from alignvl_scale.export.hf import push_to_hub
    calls = []

    class FakeApi:  # no network here: the calls huggingface_hub.HfApi would get
        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create", repo_id, private, exist_ok))

        def upload_folder(self, repo_id, folder_path, commit_message):
            calls.append(("upload", repo_id, folder_path))

    assert push_to_hub(tmp_path, "me/alignvl-test", api=FakeApi()) == "https://huggingface.co/me/alignvl-test"
    assert calls == [("create", "me/alignvl-test", True, True), ("upload", "me/alignvl-test", str(tmp_path))]


def test_the_model_card_escapes_names_and_carries_no_local_path(tmp_path):
    """A tower name with Markdown in it stays one table cell; local data paths, the run folder
    and local tower folders leave the card and the config as their last part; no placeholder
    link; the card says what to install."""
    from alignvl_scale.config import RunConfig, TowerConfig
    from alignvl_scale.export.hf import INSTALL, model_card, public_run_config

    towers = tmp_path / "towers" / "vit-tiny"
    towers.mkdir(parents=True)
    cfg = RunConfig()
    cfg.model.image_tower = TowerConfig(name=str(towers), pooling="mean")
    cfg.model.text_tower = TowerConfig(name="org/bert|`evil`", pooling="cls")
    cfg.data.train = [str(tmp_path / "shards" / "train")]
    cfg.run_dir = str(tmp_path / "runs" / "mine")
    card = model_card(cfg, {"eval": {"eval/i2t_R@1": 12.5, "eval/i2t_confidence": 40.0}})
    assert str(tmp_path) not in card and "github.com/)" not in card and INSTALL in card
    row = next(line for line in card.splitlines() if line.startswith("| text tower"))
    assert row.count(" | ") == 1 and "org/bert\\|\\`evil\\`" in row  # one cell, escaped
    assert "| `i2t_R@1` | 12.50 |" in card and "confidence" not in card.split("## Run config")[0]
    public = public_run_config(cfg.to_dict())
    assert public["run_dir"] == "mine" and public["data"]["train"] == ["train"]
    assert public["model"]["image_tower"]["name"] == "vit-tiny" and public["model"]["text_tower"]["name"] == \
        "org/bert|`evil`"
