"""Captions by matching (`clipworks.eval.phrase_caption`, `clipworks caption` with a model without a decoder or with
--phrases): phrase banks, their cached embeddings, the ranking against brute force, CLIP Interrogator's chain, and
the command line, on a tiny random-weight model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from reference import tiny_config

import clipworks
from clipworks.cli import main
from clipworks.eval.phrase_caption import (PhraseBank, TextEncoder, caption_by_matching, default_modifier_bank,
                                           default_subject_bank, embed_bank, rank_phrases)  # fmt: skip

SUBJECTS = ["a photo of a cat", "a photo of a dog", "a photo of a car", "a photo of a tree", "a photo of a house",
            "a photo of a boat", "a photo of a bird", "a photo of a chair", "a photo of a cup", "a photo of a shoe",
            "a photo of a lamp", "a photo of a horse"]  # fmt: skip
STYLES = ["watercolor", "oil painting", "pencil sketch", "3d render", "pixel art"]
VIEWS = ["close-up", "aerial view", "macro photograph", "black and white photo", "long exposure"]


@pytest.fixture(scope="module")
def loaded(model_dir):
    """(model, tokenizer) of conftest's tiny ViT-B-32-shaped model."""
    model, _, _ = clipworks.create_model_and_transforms(f"local-dir:{model_dir}")
    return model.eval(), clipworks.get_tokenizer(model)


def _encoder(loaded, **kwargs) -> TextEncoder:
    return TextEncoder(*loaded, **kwargs)


def _brute_force(loaded, texts: list[str], image: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each text, encoded alone, to `image` (E,)."""
    model, tokenizer = loaded
    with torch.no_grad():
        feats = torch.cat([model.encode_text(tokenizer([t])) for t in texts])  # (T, E), not normalised
    return F.cosine_similarity(feats, image[None], dim=-1)


# --- banks ---------------------------------------------------------------------------------------------------------


def test_a_bank_file_drops_comments_blanks_and_duplicates(tmp_path):
    path = tmp_path / "animals.txt"
    path.write_text("# animals\n\na cat\n  a dog  \na cat\n   # indented comment\n\na bird\na dog\n", encoding="utf-8")
    bank = PhraseBank.from_file(path)
    assert bank.name == "animals" and bank.phrases == ("a cat", "a dog", "a bird")
    (tmp_path / "empty.txt").write_text("# nothing here\n\n   \n")
    with pytest.raises(ValueError, match="empty.txt has no phrases"):
        PhraseBank.from_file(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="missing.txt: cannot read it"):
        PhraseBank.from_file(tmp_path / "missing.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt: cannot read it"):
        PhraseBank.from_file(tmp_path / "latin1.txt")
    with pytest.raises(ValueError, match="'none' is empty"):
        PhraseBank.from_phrases("none", ["", "  "])


def test_the_default_banks():
    subjects, modifiers = default_subject_bank(), default_modifier_bank()
    assert len(subjects.phrases) == 998 and subjects.phrases[0] == "a photo of a tench"  # two ImageNet names repeat
    assert 30 <= len(modifiers.phrases) <= 100 and {"watercolor", "close-up", "3d render"} <= set(modifiers.phrases)
    assert not any(p.startswith("#") for p in modifiers.phrases)


# --- ranking and the chain -----------------------------------------------------------------------------------------


def test_ranking_equals_a_brute_force_cosine_ranking(loaded):
    encoder = _encoder(loaded, batch_size=5)  # three batches
    bank = embed_bank(PhraseBank.from_phrases("subjects", SUBJECTS), encoder, cache_dir=None)
    image = torch.randn(bank.features.shape[1], generator=torch.Generator().manual_seed(0)) * 3  # any norm
    expected = _brute_force(loaded, SUBJECTS, image)
    ranked = rank_phrases(image, bank, len(SUBJECTS))
    assert [p for p, _ in ranked] == [SUBJECTS[i] for i in expected.argsort(descending=True).tolist()]
    assert torch.allclose(torch.tensor([s for _, s in ranked]), expected.sort(descending=True).values, atol=1e-5)
    assert [p for p, _ in rank_phrases(image, bank, 3)] == [p for p, _ in ranked[:3]]


@pytest.fixture(scope="module")
def banks(loaded):
    encoder = _encoder(loaded)
    return [embed_bank(PhraseBank.from_phrases(n, p), encoder, cache_dir=None)
            for n, p in (("subjects", SUBJECTS), ("styles", STYLES), ("views", VIEWS))]  # fmt: skip


def _target(loaded, text: str) -> torch.Tensor:
    """Image features that a caption matches well: the text's own embedding, a little perturbed."""
    noise = torch.randn(loaded[0].config.embed_dim, generator=torch.Generator().manual_seed(1)) * 0.05
    return _encoder(loaded)([text])[0] + noise


@pytest.mark.parametrize("target", ["a photo of a cat, watercolor, close-up", "a photo of a boat, aerial view, 3d "
                                    "render, long exposure, pixel art", "a photo of a lamp"])  # fmt: skip
def test_each_appended_modifier_raises_the_similarity(loaded, banks, target):
    subject, *modifiers = banks
    image = _target(loaded, target)
    encoder = _encoder(loaded)
    found = caption_by_matching(image, subject, modifiers, encoder, max_modifiers=4, top=3)
    best_subject, best_score = rank_phrases(image, subject, 1)[0]
    assert found.subjects[0] == (best_subject, pytest.approx(best_score)) and len(found.subjects) == 3
    assert found.caption == ", ".join([best_subject, *found.modifiers]) and found.similarity >= best_score
    prefixes = [", ".join([best_subject, *found.modifiers[:i]]) for i in range(len(found.modifiers) + 1)]
    sims = _brute_force(loaded, prefixes, image).tolist()
    assert sims[-1] == pytest.approx(found.similarity, abs=1e-5)
    assert all(later > earlier for earlier, later in zip(sims, sims[1:])), sims
    if "," in target:
        assert found.modifiers, "a caption built from the banks should gain a modifier"
    # each step took the best candidate: the first one beats every other single modifier
    if found.modifiers:
        pool = STYLES + VIEWS
        first = _brute_force(loaded, [f"{best_subject}, {m}" for m in pool], image)
        assert pool[int(first.argmax())] == found.modifiers[0]


def test_max_modifiers_and_candidates_bound_the_chain(loaded, banks):
    subject, *modifiers = banks
    image = _target(loaded, "a photo of a boat, aerial view, 3d render, long exposure, pixel art")
    encoder = _encoder(loaded)
    alone = caption_by_matching(image, subject, modifiers, encoder, max_modifiers=0)
    assert alone.modifiers == () and alone.caption == alone.subjects[0][0]
    assert alone.similarity == pytest.approx(alone.subjects[0][1])
    assert len(caption_by_matching(image, subject, modifiers, encoder, max_modifiers=1).modifiers) <= 1
    narrow = caption_by_matching(image, subject, modifiers, encoder, candidates=1)
    allowed = {rank_phrases(image, bank, 1)[0][0] for bank in modifiers}
    assert set(narrow.modifiers) <= allowed
    with pytest.raises(ValueError, match="max_modifiers >= 0"):
        caption_by_matching(image, subject, modifiers, encoder, max_modifiers=-1)


# --- the cache -----------------------------------------------------------------------------------------------------


def test_the_bank_cache_is_reused_and_a_damaged_file_recomputed(loaded, tmp_path, monkeypatch):
    model, _ = loaded
    calls = []
    encode_text = model.encode_text
    monkeypatch.setattr(model, "encode_text", lambda *a, **k: calls.append(1) or encode_text(*a, **k))
    bank = PhraseBank.from_phrases("subjects", SUBJECTS)
    cache = tmp_path / "cache"

    def embed():
        calls.clear()
        return embed_bank(bank, _encoder(loaded, identity="tiny-model", batch_size=5), cache).features

    fresh = embed()
    assert len(calls) == 3  # ceil(12 / 5) batches
    (path,) = cache.glob("subjects-*.safetensors")
    assert torch.equal(embed(), fresh) and calls == []  # read back: nothing encoded
    data = bytearray(path.read_bytes())
    data[-8:] = bytes(8)  # damaged features: the file still parses, the checksum no longer matches
    path.write_bytes(bytes(data))
    assert torch.equal(embed(), fresh) and len(calls) == 3
    assert torch.equal(embed(), fresh) and calls == []  # the recomputed file replaced the damaged one
    path.write_bytes(path.read_bytes()[:100])  # truncated
    assert torch.equal(embed(), fresh) and len(calls) == 3
    assert not list(cache.glob("*.tmp*"))
    other = embed_bank(PhraseBank.from_phrases("subjects", SUBJECTS[:5]), _encoder(loaded, identity="tiny-model"),
                       cache)  # fmt: skip
    assert len(other.features) == 5 and len(list(cache.glob("subjects-*"))) == 2  # the key hashes the phrases
    embed_bank(bank, _encoder(loaded, identity=None), tmp_path / "random")  # random weights: never cached
    assert not (tmp_path / "random").exists()


# --- clipworks caption ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A folder with two images, a broken one, a subject bank, two modifier banks and an empty bank."""
    root = tmp_path_factory.mktemp("caption")
    Image.new("RGB", (40, 30), (200, 40, 40)).save(root / "red.png")
    Image.new("RGB", (30, 40), (30, 60, 220)).save(root / "blue.jpg")
    (root / "broken.png").write_bytes(b"not an image")
    (root / "subjects.txt").write_text("# subjects\n" + "\n".join(SUBJECTS) + "\n")
    (root / "styles.txt").write_text("\n".join(STYLES) + "\n")
    (root / "views.txt").write_text("\n".join(VIEWS) + "\n")
    (root / "empty.txt").write_text("# no phrase\n")
    return root


def _run(capsys, *argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `clipworks argv` run in this process."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's errors
        status = e.code
    out = capsys.readouterr()
    return status, out.out, out.err


def test_caption_by_matching_end_to_end(model_dir, files, tmp_path, capsys):
    images = [files / "red.png", files / "broken.png", files / "blue.jpg"]
    status, out, err = _run(capsys, "caption", "--model", f"local-dir:{model_dir}", "--device", "cpu", "--phrases",
                            files / "subjects.txt", "--modifiers", files / "styles.txt", "--modifiers",
                            files / "views.txt", "--top", "2", "--cache-dir", tmp_path, *images)  # fmt: skip
    assert status == 0, err
    lines = out.splitlines()
    assert len(lines) == 6 and "1 unreadable image skipped" in err and "broken.png" in err
    model, _, preprocess = clipworks.create_model_and_transforms(f"local-dir:{model_dir}")
    encoder = TextEncoder(model, clipworks.get_tokenizer(model))
    banks = [embed_bank(PhraseBank.from_file(files / n), encoder, None) for n in ("subjects.txt", "styles.txt",
                                                                               "views.txt")]  # fmt: skip
    from clipworks.data.decode import load_image

    for block, image in zip((lines[:3], lines[3:]), (images[0], images[2])):
        with torch.no_grad():
            features = model.encode_image(preprocess(load_image(image))[None], normalize=True)[0]
        found = caption_by_matching(features, banks[0], banks[1:], encoder, top=2)
        assert block[0] == f"{image}\t{found.caption}"
        assert [line.split() for line in block[1:]] == [[f"{s:+.4f}", *p.split()] for p, s in found.subjects]
    assert len(list(tmp_path.glob("*.safetensors"))) == 3  # the three banks, cached
    # the default banks: ImageNet subjects, shipped modifiers
    status, out, err = _run(capsys, "caption", "--model", f"local-dir:{model_dir}", "--device", "cpu",
                            "--no-cache", "--max-modifiers", "0", images[0])  # fmt: skip
    assert status == 0, err
    (line,) = out.splitlines()
    assert line.startswith(f"{images[0]}\ta photo of a ") and "," not in line.split("\t")[1]


@pytest.fixture(scope="module")
def coca_dir(tmp_path_factory):
    from clipworks.checkpoints.export import save_pretrained

    torch.manual_seed(0)
    model = clipworks.create_model(tiny_config(clipworks.get_preset("coca_ViT-B-32")))
    return save_pretrained(model, tmp_path_factory.mktemp("coca") / "tiny")


def test_a_coca_model_given_phrases_captions_by_matching(coca_dir, files, capsys):
    status, out, err = _run(capsys, "caption", "--model", f"local-dir:{coca_dir}", "--device", "cpu", "--phrases",
                            files / "subjects.txt", "--modifiers", files / "styles.txt", "--no-cache",
                            files / "red.png")  # fmt: skip
    assert status == 0, err
    path, caption = out.strip().split("\t")
    assert path == str(files / "red.png") and caption.split(", ")[0] in SUBJECTS
    assert set(caption.split(", ")[1:]) <= set(STYLES)


@pytest.mark.parametrize("extra, message", [
    (["--phrases", "{f}/subjects.txt", "--num-beams", "4", "--top-p", "0.5"],
     "--num-beams, --top-p only apply to generated captions, and --phrases captions by matching; drop them"),
    (["--generation", "top_k"], "--generation only applies to generated captions, and --model local-dir:{m} has no "
                                "caption decoder: it captions by matching phrases; drop it"),
    (["--max-modifiers", "-1"], "--max-modifiers (-1) and --top (0) must be at least 0"),
    (["--phrases", "{f}/empty.txt"], "phrase bank {f}/empty.txt has no phrases"),
    (["--modifiers", "{f}/nowhere.txt"], "phrase bank {f}/nowhere.txt: cannot read it (No such file or directory)"),
])  # fmt: skip
def test_usage_errors_are_one_line_and_exit_2(model_dir, files, capsys, extra, message):
    argv = [a.format(f=files) for a in extra]
    status, out, err = _run(capsys, "caption", "--model", f"local-dir:{model_dir}", "--device", "cpu", "--no-cache",
                            *argv, files / "red.png")  # fmt: skip
    lines = err.strip().splitlines()
    assert status == 2 and out == "" and len(lines) == 1 and lines[0].startswith("clipworks caption: error: "), err
    assert message.format(f=files, m=model_dir) in lines[0]


def test_matching_flags_with_a_generated_caption_are_refused(coca_dir, files, capsys):
    status, _, err = _run(capsys, "caption", "--model", f"local-dir:{coca_dir}", "--device", "cpu", "--top", "0",
                          "--modifiers", files / "styles.txt", "--max-modifiers", "0", files / "red.png")  # fmt: skip
    (line,) = err.strip().splitlines()  # (0 counts as given)
    assert status == 2 and line.startswith("clipworks caption: error: --modifiers, --max-modifiers, --top only apply "
                                           "to captions by "
                                           f"matching, and --model local-dir:{coca_dir} generates its captions; add "
                                           "--phrases FILE")  # fmt: skip
