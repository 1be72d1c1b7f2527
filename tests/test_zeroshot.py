import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import png_bytes

from alignvl_scale.data.shards import DataSourceError
from alignvl_scale.evaluation.zeroshot import (
    class_embeddings,
    load_zero_shot_set,
    write_zero_shot_set,
    zero_shot_accuracy,
)


def test_accuracy_on_a_hand_computed_case():
    classes = torch.eye(6)  # class c is the unit vector e_c
    images = F.pad(torch.tensor([[1.0, 0.2, 0.0],    # label 0: first -> top1 and top5
                                 [0.9, 0.5, 0.0],    # label 1: second -> top5 only
                                 [0.5, 0.0, 0.5],    # label 2: tied with class 0 -> the tie counts against it
                                 [0.0, 0.1, 0.9]]), (0, 3))  # label 2: first
    got = zero_shot_accuracy(images, classes, torch.tensor([0, 1, 2, 2]))
    assert got == {"top1": 50.0, "top5": 100.0}
    assert zero_shot_accuracy(images, classes[:3, :], torch.tensor([0, 1, 2, 2])).keys() == {"top1"}  # < 5 classes


def test_class_embedding_is_the_normalized_mean_of_normalized_prompts():
    prompts = torch.tensor([[2.0, 0.0], [0.0, 3.0],    # class 0: two templates
                            [0.0, -1.0], [0.0, -5.0]])  # class 1
    got = class_embeddings(prompts, 2)
    torch.testing.assert_close(got, torch.stack([F.normalize(torch.tensor([1.0, 1.0]), dim=0),
                                                 torch.tensor([0.0, -1.0])]))


def test_image_folder_with_classes_and_templates(tmp_path):
    for label, name in enumerate(("n01_cat", "n02_dog")):
        (tmp_path / name).mkdir()
        for i in range(2):
            (tmp_path / name / f"{i}.png").write_bytes(png_bytes(10 * label + i))
    (tmp_path / "n02_dog" / "notes.txt").write_text("not an image, not read")
    (tmp_path / "n02_dog" / "broken.png").write_text("not a png")
    (tmp_path / "classes.txt").write_text("n02_dog\tdog\nn01_cat\tcat\n")
    (tmp_path / "templates.txt").write_text("a photo of a {}.\na drawing of a {}.\n")
    zs = load_zero_shot_set(tmp_path)
    assert zs.classes == ["dog", "cat"] and zs.templates == ["a photo of a {}.", "a drawing of a {}."]
    assert zs.labels == [0, 0, 1, 1] and zs.counts.skipped["undecodable_image"] == 1
    with pytest.raises(DataSourceError, match="classes file not found"):
        load_zero_shot_set(tmp_path, classes_file=tmp_path / "none.txt")
    (tmp_path / "classes.txt").unlink()
    assert load_zero_shot_set(tmp_path).classes == ["n01 cat", "n02 dog"]  # subfolders, sorted


@pytest.mark.parametrize("setup,message", [
    (lambda p: (p / "templates.txt").write_text("no placeholder\n"), "needs one {} for the class name"),
    (lambda p: (p / "templates.txt").write_text("a photo of a {} {x}\n"), "not 'a photo of a {} {x}'"),
    (lambda p: (p / "templates.txt").write_text("a {0} and a {}\n"), "no other field"),
    (lambda p: (p / "classes.txt").write_text("a\nmissing\n"), "missing ['missing']"),
    (lambda p: (p / "classes.txt").write_text("a\nb\n" + "a\n" * 5000), "1 subfolders listed more than once: ['a']"),
    (lambda p: (p / "classes.txt").write_text("a\tcat\nb\tcat\n"), "class names listed more than once: ['cat']"),
    (lambda p: (p / "b" / "0.png").unlink(), "1 classes have no image file: ['b']"),
    (lambda p: (p / "b" / "0.png").write_text("not a png"), "no readable image in 1 classes (['b']"),
    (lambda p: shutil.rmtree(p / "b"), "needs at least 2 class subfolders"),
])
def test_bad_zero_shot_sets_are_named(tmp_path, setup, message):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "0.png").write_bytes(png_bytes(len(name)))
    setup(tmp_path)
    with pytest.raises(DataSourceError, match=re.escape(message)):
        load_zero_shot_set(tmp_path)


class CountingEncoder:
    """The evaluation's view of a model: images (PNG bytes) and prompts to fixed vectors, every
    image it encodes counted."""

    def __init__(self) -> None:
        self.model, self.image_memo, self.encoded = torch.nn.Linear(1, 1), {}, []

    def encode_images(self, images: list[bytes]) -> torch.Tensor:
        self.encoded += images
        return F.normalize(torch.stack([torch.tensor([float(len(b) % 7), float(b[-5]), 1.0]) for b in images]), dim=-1)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return F.normalize(torch.stack([torch.tensor([float(len(t) % 5), 1.0, float(t.count("a"))]) for t in texts]),
                           dim=-1)

    def calibration(self):
        from alignvl_scale.evaluation.metrics import Calibration

        return Calibration("softmax", 10.0)


def test_an_image_set_is_encoded_once_for_retrieval_and_every_zero_shot_task(tmp_path, capsys):
    """The demo's pattern: one held-out image set, a retrieval set and two zero-shot tasks
    over it (by group, by subgroup): each distinct image is encoded once, the results equal
    those of encoding everything afresh, and each encoding shows its progress."""
    from alignvl_scale.data.evalsets import RetrievalSet
    from alignvl_scale.evaluation.evaluate import evaluate_set, evaluate_zero_shot

    pngs = [png_bytes(i) for i in range(12)]
    sets = {}
    for name, groups in (("group", 3), ("subgroup", 4)):
        write_zero_shot_set(tmp_path / name, [(f"c{i % groups}", f"k{i}", png) for i, png in enumerate(pngs)],
                            {f"c{g}": f"thing {g}" for g in range(groups)}, ("a {}.",))
        sets[name] = load_zero_shot_set(tmp_path / name)
    retrieval = RetrievalSet()
    for i, png in enumerate(pngs + pngs[:2]):  # two images twice
        retrieval.add(png, [f"caption {i}"])

    def evaluate(encoder):
        return [evaluate_set(encoder, retrieval, 4), *(evaluate_zero_shot(encoder, s, 4) for s in sets.values())]

    shared = CountingEncoder()
    got = evaluate(shared)
    assert len(shared.encoded) == 12 and sorted(shared.encoded) == sorted(pngs)
    fresh = []
    for _ in range(3):  # each evaluation with an empty memo: what encoding everything afresh gives
        encoder = CountingEncoder()
        fresh.append(evaluate(encoder)[len(fresh)])
    assert got == fresh
    err = capsys.readouterr().err
    assert "retrieval: 12 images" in err and "zero-shot: 12 texts" not in err and "zero-shot: 3 texts" in err
