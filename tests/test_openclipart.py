"""The Openclipart benchmark's builder on SVG files made here (not the Debian package):
metadata, rendering, skips by reason, and the split's rules."""

import json
import random
import shutil

import pytest

import alignvl_scale.studies.openclipart as oc
from alignvl_scale.data.evalsets import load_retrieval_set
from alignvl_scale.evaluation.zeroshot import load_zero_shot_set
from alignvl_scale.studies.openclipart import Clip, OpenclipartMissing, build_openclipart, normalize, split

needs_rsvg = pytest.mark.skipif(shutil.which("rsvg-convert") is None,
                                reason="rsvg-convert missing: apt-get install librsvg2-bin (.ci/run installs it)")


def svg(title: str | None, tags: list[str] = (), drawing: str = "", creator: str = "Some Artist") -> str:
    """An SVG as Openclipart's are: RDF metadata with dc:title, dc:subject tags, dc:creator."""
    title_xml = f"<dc:title>{title}</dc:title>" if title is not None else ""
    tags_xml = "".join(f"<rdf:li>{t}</rdf:li>" for t in tags)
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:dc="http://purl.org/dc/elements/1.1/"
     xmlns:cc="http://web.resource.org/cc/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"
     width="100" height="50" viewBox="0 0 100 50">
  <metadata><rdf:RDF><cc:Work rdf:about="">{title_xml}
    <dc:subject><rdf:Bag>{tags_xml}</rdf:Bag></dc:subject>
    <dc:creator><cc:Agent><dc:title>{creator}</dc:title></cc:Agent></dc:creator>
  </cc:Work></rdf:RDF></metadata>
  {drawing}
</svg>"""


def shape(i: int) -> str:
    """A drawing unlike every other i's (position, size and color from i)."""
    rng = random.Random(i)
    color = "#" + "".join(f"{rng.randrange(200):02x}" for _ in range(3))
    return (f'<rect x="{rng.randrange(40)}" y="{rng.randrange(20)}" width="{10 + rng.randrange(50)}" '
            f'height="{5 + rng.randrange(25)}" fill="{color}"/><circle cx="{rng.randrange(100)}" cy="25" r="8"/>')


def write_tree(root):
    """Every case the builder handles, with what it must make of each."""
    files = {
        # 20 with titles of their own, two categories (the test share is random by title hash)
        **{f"animals/mammals/animal_{i}.svg": svg(f"Animal Number {'abcdefghijklmnopqrst'[i]}", ["mammal", "hash"],
                                                  shape(i)) for i in range(10)},
        **{f"food/food_{i}.svg": svg(f"Food Item {'abcdefghijklmnopqrst'[i]}_2", [f"tag {'klmnopqrst'[i]}"],
                                     shape(100 + i)) for i in range(10)},
        # one title on two images: both in training; "Guitar1" and "guitar 2" normalize alike
        "recreation/guitar1.svg": svg("Guitar1", [], shape(200)),
        "recreation/guitar2.svg": svg("guitar 2", [], shape(201)),
        # a collection title (on more than MAX_TITLE_IMAGES = 3 images here)
        **{f"shapes/star_{i}.svg": svg("gramastar", ["stars"], shape(300 + i)) for i in range(4)},
        "shapes/untitled.svg": svg(None, [], shape(400)),
        "shapes/empty_title.svg": svg("  ", [], shape(401)),
        "shapes/broken.svg": "<svg><metadata>",
        "shapes/nothing_drawn.svg": svg("Blank Page", [], ""),
        "shapes/no_size.svg": svg("No Size", [], shape(402)).replace('width="100" height="50"', 'width="0" height="0"'),
        # the same picture as food_0 under another title (after it in path order: the copy is the skip)
        "food/z_copy_of_food_0.svg": svg("Copy Of Food", [], shape(100)),
        # a title that is another image's tags caption: never held out
        "food/tagged.svg": svg("Tag K", [], shape(500)),
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "animals" / "link_to_animal_0.svg").symlink_to(root / "animals" / "mammals" / "animal_0.svg")


def test_captions_normalize_to_letters_and_drop_the_clipart_by_prefix():
    assert normalize("Pink-Rose") == "pink rose"
    assert normalize("guitar1") == normalize("Guitar 2") == "guitar"
    assert normalize("Clipart by Nicu Buculei - baloon1_04") == "baloon"
    assert normalize("Coniglio") == "coniglio" and normalize("Fête  d'été") == "fête d été"
    assert oc.tags_caption(["hash", "", "Flag", "oceania", "Some_Artist", "flag"], "samoa", "Some Artist") \
        == "flag, oceania"
    assert oc.tags_caption(["samoa"], "samoa", "") == ""  # the title again: no second caption


@needs_rsvg
def test_builder_counts_every_skip_by_reason_and_keeps_held_out_captions_out_of_training(tmp_path, monkeypatch,
                                                                                           capsys):
    monkeypatch.setattr(oc, "MAX_TITLE_IMAGES", 3)
    monkeypatch.setattr(oc, "MIN_ZERO_SHOT_IMAGES", 1)
    write_tree(tmp_path / "svg")
    counts = build_openclipart(tmp_path / "out", tmp_path / "svg", samples_per_shard=8)
    rendered = capsys.readouterr().err  # the render shows its progress, SVG by SVG
    assert "render Openclipart SVGs" in rendered and "svg/s" in rendered
    assert counts["skipped"] == {"link": 1, "unreadable_metadata": 1, "no_title": 2, "collection_title": 4,
                                 "does_not_render": 1, "blank_render": 1, "duplicate_image": 1}
    assert counts["train"] + counts["test"] == 10 + 10 + 2 + 1  # animals, foods, the guitars, the tagged one
    train = load_retrieval_set(str(tmp_path / "out" / "train"))
    test = load_retrieval_set(str(tmp_path / "out" / "test"))
    train_captions, test_captions = set(map(normalize, train.texts)), list(map(normalize, test.texts))
    assert not train_captions & set(test_captions)  # no held-out caption occurs in training
    assert len(test_captions) == len(set(test_captions))  # nor twice among the held-out ones
    assert {"guitar", "tag k"} <= train_captions  # a shared title, and a title that is a tags caption
    assert "copy of food" not in train_captions | set(test_captions)  # the duplicate picture
    assert counts["test"] >= 10 and json.loads((tmp_path / "out" / "build.json").read_text()) == counts
    zero_shot = load_zero_shot_set(tmp_path / "out" / "zeroshot_category")
    assert set(zero_shot.classes) <= {"animals", "food", "recreation", "shapes"} and zero_shot.images
    assert build_openclipart(tmp_path / "out", tmp_path / "nowhere") == counts  # built: not again


def test_split_keeps_a_title_on_one_side_and_held_out_captions_unique():
    """The rules on many random clips (no rendering): titles drawn from a small vocabulary so
    that many repeat, tags captions that often repeat."""
    rng = random.Random(0)
    words = [f"w{chr(97 + i)}{chr(97 + j)}" for i in range(26) for j in range(6)]
    clips = [Clip(f"c/{i}.svg", "c", " ".join(rng.sample(words, rng.choice([1, 1, 2]))),
                  rng.choice(["", "red, blue", "green", " ".join(rng.sample(words, 2))])) for i in range(3000)]
    train, test, dropped = split(clips)
    side = {}
    for name, rows in (("train", train), ("test", test)):
        for clip, _ in rows:
            assert side.setdefault(clip.title, name) == name  # a title on one side only
    train_captions = {c for _, captions in train for c in captions}
    test_captions = [c for _, captions in test for c in captions]
    assert not train_captions & set(test_captions) and len(test_captions) == len(set(test_captions))
    assert len(test) > 300 and dropped > 0 and len(train) + len(test) == len(clips)


def test_a_missing_package_or_renderer_says_what_to_install(tmp_path, monkeypatch):
    with pytest.raises(OpenclipartMissing, match="apt-get install openclipart-svg librsvg2-bin"):
        build_openclipart(tmp_path / "out", tmp_path / "no_such_folder")
    (tmp_path / "svg").mkdir()
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(OpenclipartMissing, match="rsvg-convert .* install it: apt-get install"):
        build_openclipart(tmp_path / "out", tmp_path / "svg")


def test_the_demo_without_the_debian_packages_is_one_line(tmp_path, monkeypatch, capsys):
    """`alignvl-scale demo --benchmark openclipart` without openclipart-svg: one line saying
    what to install, exit code 2, no traceback (it was 20 lines of traceback first)."""
    from alignvl_scale import cli
    from alignvl_scale.studies import openclipart

    monkeypatch.setattr(openclipart, "SVG_ROOT", tmp_path / "no_such_folder")
    assert cli.main(["demo", "--benchmark", "openclipart", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("alignvl-scale demo: no Openclipart SVGs at "), err
    assert "apt-get install openclipart-svg librsvg2-bin" in err[0]
