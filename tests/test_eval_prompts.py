"""Shipped class names and templates equal the references'; zero-shot weights and template files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from reference import tiny_config

import clipworks
from clipworks.eval.embed import Embedder
from clipworks.eval.prompts import imagenet_class_names, load_templates, parse_labels, zero_shot_weights
from clipworks.train.zeroshot import build_classifier


def _clip_benchmark_file(name: str) -> dict:
    import clip_benchmark.datasets

    return json.loads((Path(clip_benchmark.datasets.__file__).parent / name).read_text())


def test_imagenet_class_names_equal_clip_benchmark_and_open_clip():
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    names = imagenet_class_names()
    assert names == _clip_benchmark_file("en_classnames.json")["imagenet1k"]
    assert names == list(IMAGENET_CLASSNAMES)
    assert len(names) == 1000 and names[0] == "tench" and names[-1] == "toilet paper"


def test_templates_equal_the_references():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    ref = _clip_benchmark_file("en_zeroshot_classification_templates.json")["imagenet1k"]  # written with "{c}"
    assert load_templates("imagenet") == [t.replace("{c}", "{}") for t in ref]
    assert load_templates("imagenet") == [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    assert load_templates("simple") == [t("{}") for t in SIMPLE_IMAGENET_TEMPLATES]
    assert len(load_templates("imagenet")) == 80 and len(load_templates("simple")) == 7


def test_template_files(tmp_path):
    lines = tmp_path / "t.txt"
    lines.write_text("# mine\na {} photo\n\nart of {}\n")
    assert load_templates(str(lines)) == ["a {} photo", "art of {}"]
    listed = tmp_path / "t.json"
    listed.write_text(json.dumps(["x {}"]))
    assert load_templates(str(listed)) == ["x {}"]
    lines.write_text("no placeholder\n")
    with pytest.raises(ValueError, match="exactly one"):
        load_templates(str(lines))
    with pytest.raises(FileNotFoundError, match="imagenet, simple, photo"):
        load_templates("imagenet80")


def test_parse_labels():
    assert parse_labels(" cat ,dog,car") == ["cat", "dog", "car"]
    with pytest.raises(ValueError, match=r"duplicate class names \['dog'\]"):
        parse_labels("dog,cat,dog")


def test_zero_shot_weights_in_chunks_and_from_cached_texts_equal_build_classifier():
    torch.manual_seed(0)
    model = clipworks.create_model(tiny_config(clipworks.get_preset("ViT-B-32")))
    tok = clipworks.get_tokenizer(model)
    names, templates = ["cat", "dog", "red car", "tree", "house"], load_templates("simple")
    ref = build_classifier(model, tok, names, templates)
    chunked = zero_shot_weights(model, tok, names, templates, max_prompts=14)  # 2 classes a chunk
    embedded = Embedder(model, lambda x: x, tok, batch_size=4, show_progress=False).text_weights(names, templates)
    assert torch.allclose(chunked, ref, atol=1e-6) and torch.allclose(embedded, ref, atol=1e-6)
    assert torch.allclose(ref.norm(dim=-1), torch.ones(5), atol=1e-6)
