"""The Hugging Face side of export (the folder itself is checked in test_train's export tests)."""


def test_push_to_hub_uploads_the_folder_it_was_given(tmp_path):
    from alignvl_scale.hf import push_to_hub
    calls = []

    class FakeApi:  # no network here: the calls huggingface_hub.HfApi would get
        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create", repo_id, private, exist_ok))

        def upload_folder(self, repo_id, folder_path, commit_message):
            calls.append(("upload", repo_id, folder_path))

    assert push_to_hub(tmp_path, "me/alignvl-test", api=FakeApi()) == "https://huggingface.co/me/alignvl-test"
    assert calls == [("create", "me/alignvl-test", True, True), ("upload", "me/alignvl-test", str(tmp_path))]
