"""The Hugging Face tokenizers (SigLIP, SigLIP 2, MetaCLIP 2, RoBERTa/XLM-R/mT5/NLLB): ids identical to OpenCLIP's
`HFTokenizer` on ordinary and hostile texts, literal special tokens kept as text, the shared tokenizer interface,
errors, the hub path through a fake hub, checkpoints that carry their tokenizer, and the CLI."""

from __future__ import annotations

import json
import random
import shutil
import string
import warnings
from dataclasses import replace

import pytest
import torch

import clipworks
from clipworks import cli, hf_conventions
from clipworks.checkpoints.open_clip_dir import config_to_open_clip, tokenizer_from_open_clip
from clipworks.config import TokenizerConfig
from clipworks.factory import get_tokenizer
from clipworks.hf_tokenizer import HFTokenizer, clean, load_hf_tokenizer, tokenizer_config_of_dir
from clipworks.tokenizer import TextTokenizer, Tokenizer
from reference import perturb_, tiny_config
from tokenizer_files import BUILDERS, NLLB_LANGUAGES

tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("sentencepiece")
open_clip = pytest.importorskip("open_clip")
open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")
pytest.importorskip("transformers").logging.set_verbosity_error()

# family: (context length, cleaning) as OpenCLIP's configs use them
FAMILIES = {
    "siglip": (64, "canonicalize"),  # SigLIP (English and i18n: the same T5 class over another vocabulary)
    "gemma": (64, "canonicalize"),  # SigLIP 2
    "xlm_roberta": (77, "whitespace"),  # MetaCLIP 2's XLM-V, XLM-R text towers
    "roberta": (77, "whitespace"),
    "nllb": (77, "whitespace"),
    "mt5": (77, "canonicalize"),  # MetaCLIP 2 L/14 (google/mt5-base ships spiece.model only)
    "bert": (32, "whitespace"),  # CLIPA (bert-base-uncased; see test_clipa_strips_the_separator)
}
HOSTILE = [
    "a dog on the beach", "", " ", "   \t\n ", "A DOG on the grass, 3 birds!", " ".join(["word"] * 1000), "x" * 3000,
    "😀🐶 emoji 🌅🌅", "日本語のテキスト 東京 犬", "مرحبا بالعالم", "e\u0301 combining a\u0308\u0301 \u0308", "¨", "a ¨ b",
    "¨¨¨ a ´ b ¯ c ¸", "½ and ¼", "ﬁ ① ™ … Ⅻ ㍿ ﾊﾝｶｸ", "\x00\x01\x07 control \x1b[31mred\x7f",
    "\u200b zero\u200bwidth \ufeff bom \u200e", "&amp; &lt;b&gt; &#39;quoted&#39; &nbsp;x",
    "Ã©tÃ© mojibake â€œquotesâ€\x9d",
    "!!! ??? ...", "-", "a ▁b ▁ c▁d", "  leading and trailing  ", "\u3000ideographic\u3000space a\u00a0nbsp",
    "tab\tsep\nnewline", "12345 678,9", "snake_case_words and dashes-here", "ÀÉÎÕÜ çñ İstanbul ß", "\ufffd x\u061c",
    "\U0001F468\u200d\U0001F469\u200d\U0001F467 family", "<table> <b>html</b>",
]  # fmt: skip
SPECIAL_STRINGS = ["hello </s> world", "<pad> <s> <unk> <mask>", "eng_Latn fra_Latn text", "<bos> <eos> x",
                   "[CLS] [SEP] [PAD] [MASK] [UNK] x"]  # fmt: skip
CAPTIONS = ["a photo of a cat", "two dogs playing in the snow at night", "A red car parked near the old bridge."]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tokenizers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {name: build(root / name / "tok") for name, build in BUILDERS.items()}


def reference(path, family: str, **kwargs):
    context, mode = FAMILIES[family]
    return open_clip_tokenizer.HFTokenizer(str(path), context_length=context, clean=mode, **kwargs)


def ours(path, family: str, **kwargs) -> HFTokenizer:
    context, mode = FAMILIES[family]
    return HFTokenizer(path, context_length=context, clean=mode, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_ids_match_open_clip(family, dirs):
    ref, tok = reference(dirs[family], family), ours(dirs[family], family)
    assert torch.equal(tok(HOSTILE), ref(HOSTILE))
    assert torch.equal(tok(CAPTIONS, context_length=6), ref(CAPTIONS, context_length=6))  # truncation keeps the end
    assert torch.equal(tok("one text"), ref("one text"))


def test_clipa_strips_the_separator(dirs):
    """CLIPA's configs ask for `strip_sep_token`: BERT's closing [SEP] becomes 0, as OpenCLIP writes it."""
    ref = reference(dirs["bert"], "bert", strip_sep_token=True)
    tok = ours(dirs["bert"], "bert", strip_sep_token=True)
    assert torch.equal(tok(HOSTILE), ref(HOSTILE)) and torch.equal(tok(CAPTIONS), ref(CAPTIONS))
    plain = ours(dirs["bert"], "bert").tokenize(CAPTIONS)
    stripped = tok.tokenize(CAPTIONS)
    assert (plain.ids == tok._strip_id).sum() == len(CAPTIONS) and not (stripped.ids == tok._strip_id).any()
    assert torch.equal(stripped.lengths, plain.lengths - 1)
    assert torch.equal(stripped.attention_mask.sum(1), stripped.lengths)
    with pytest.raises(ValueError, match="no separator token"):
        ours(dirs["siglip"], "siglip", strip_sep_token=True)


def test_clean_is_open_clips_cleaning():
    rng = random.Random(0)
    ascii_texts = ["".join(rng.choice(string.printable) for _ in range(rng.randint(0, 40))) for _ in range(300)]
    for mode in ("lower", "canonicalize", "whitespace"):
        reference_clean = open_clip_tokenizer.get_clean_fn(mode)
        for text in HOSTILE + SPECIAL_STRINGS + ascii_texts:
            assert clean(text, mode) == reference_clean(text), (mode, text)


@pytest.mark.parametrize("mode", ["lower", "canonicalize", "whitespace"])
def test_every_cleaning_mode_matches_open_clip(mode, dirs):
    ref = open_clip_tokenizer.HFTokenizer(str(dirs["xlm_roberta"]), context_length=40, clean=mode)
    assert torch.equal(HFTokenizer(dirs["xlm_roberta"], 40, mode)(HOSTILE), ref(HOSTILE))


@pytest.mark.parametrize("family", FAMILIES)
def test_special_token_strings_are_text(family, dirs):
    """The deliberate difference: "</s>" in a caption is text (transformers makes it the end token)."""
    tok = ours(dirs[family], family)
    specials = {tok.pad_token_id, tok.eot_token_id, tok.sot_token_id} - {None}
    for text in SPECIAL_STRINGS:
        ids = tok.encode(text)
        assert ids and not specials & set(ids), (text, ids)
    if FAMILIES[family][1] == "whitespace":  # canonicalizing drops the brackets, so transformers sees plain text
        assert not torch.equal(tok(SPECIAL_STRINGS), reference(dirs[family], family)(SPECIAL_STRINGS))


def test_hidden_control_pieces_change_no_other_id(dirs):
    tok = ours(dirs["xlm_roberta"], "xlm_roberta")
    encoder = tok._encoder
    plain = encoder.encode_batch(HOSTILE)
    mixed = encoder.encode_batch(HOSTILE + ["x </s> y"])  # builds the second, control-free tokenizer
    assert encoder._text_only is not None and mixed[:-1] == plain
    assert encoder._encode(encoder._text_only, HOSTILE) == plain


def test_nllb_language(dirs):
    """language= picks the code NLLB puts first, as transformers' NllbTokenizer(src_lang=...) does. (OpenCLIP's own
    language= has no effect: its set_language sets the tokenizer's framing, which resets to src_lang on each call.)"""
    path = dirs["nllb"]
    for language in (None, "fra_Latn", "zho_Hans"):
        tok = ours(path, "nllb", **({"language": language} if language else {}))
        ref = reference(path, "nllb", **({"src_lang": language} if language else {}))
        assert torch.equal(tok(HOSTILE), ref(HOSTILE))
        assert tok.language == (language or "eng_Latn")
        assert tok.sot_token_id == tok._encoder.token_id(tok.language)
    assert torch.equal(reference(path, "nllb", language="fra_Latn")(CAPTIONS), ours(path, "nllb")(CAPTIONS))
    with pytest.raises(ValueError, match=r"unknown language 'xx_Latn'.*arb_Arab.*eng_Latn"):
        ours(path, "nllb", language="xx_Latn")
    with pytest.raises(ValueError, match="only NLLB tokenizers take a language"):
        ours(dirs["siglip"], "siglip", language="eng_Latn")
    assert set(NLLB_LANGUAGES) <= tok._encoder.special_tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenize_lengths_mask_and_decode(family, dirs):
    tok = ours(dirs[family], family)
    assert isinstance(tok, TextTokenizer) and tok.context_length == FAMILIES[family][0]
    batch = tok.tokenize(CAPTIONS + ["", " ".join(["word"] * 1000)])
    framing = len(tok._prefix) + len(tok._suffix)
    expected = [min(len(tok.encode(t)) + framing, tok.context_length) for t in CAPTIONS + ["", "word " * 1000]]
    assert batch.lengths.tolist() == expected
    assert torch.equal(batch.attention_mask, torch.arange(tok.context_length) < batch.lengths[:, None])
    assert (batch.ids[~batch.attention_mask] == tok.pad_token_id).all()
    assert (batch.ids[torch.arange(5), batch.lengths - 1] == tok.eot_token_id).all()
    texts = [clean(t, FAMILIES[family][1]) for t in CAPTIONS]
    texts = [t.lower() for t in texts] if family == "bert" else texts  # an uncased vocabulary
    assert tok.batch_decode(batch.ids[:3], skip_special_tokens=True) == texts
    assert tok.decode(tok.encode(CAPTIONS[1])) == texts[1]
    assert tok.decode(batch.ids[0]).count(tok.decode([tok.eot_token_id]))  # special tokens spelled out
    assert len(tok.encode(" ".join(["word"] * 1000))) >= 1000  # encode does not truncate


def test_left_padding_and_flags_from_tokenizer_config(dirs, tmp_path):
    """Gemma's class pads on the left unless the config says otherwise; add_bos_token / add_eos_token in the config do
    not change tokenizer.json's framing (transformers 5 drops them when a tokenizer.json is there)."""
    path = shutil.copytree(dirs["gemma"], tmp_path / "gemma")
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("padding_side")
    config["add_bos_token"] = True
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    tok, ref = ours(path, "gemma"), reference(path, "gemma")
    assert torch.equal(tok(HOSTILE), ref(HOSTILE))
    batch = tok.tokenize(CAPTIONS)
    assert batch.attention_mask[:, -1].all() and not batch.attention_mask[:, 0].all()
    assert (batch.ids[:, -1] == tok.eot_token_id).all() and tok.sot_token_id is None


def _as_transformers_4_wrote_it(path, family: str) -> None:
    """Rewrite tokenizer.json's normalizer and pre-tokenizer as transformers 4's converters wrote them."""
    spec = json.loads((path / "tokenizer.json").read_text())
    charsmap = hf_conventions._precompiled(spec)
    strip = {"type": "Strip", "strip_left": False, "strip_right": True}
    spaces = {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": "\u2581"}
    spec["normalizer"] = {"type": "Sequence", "normalizers": [charsmap, strip, spaces]}
    scheme = "first" if family == "siglip" else "always"  # T5 with legacy=False, as OpenCLIP's SigLipTokenizer
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": scheme, "split": True}
    (path / "tokenizer.json").write_text(json.dumps(spec))


@pytest.mark.parametrize("family", ["siglip", "xlm_roberta", "nllb"])
def test_files_written_by_transformers_4_give_transformers_5s_ids(family, dirs, tmp_path):
    """transformers 5 rebuilds these classes' pipelines instead of running tokenizer.json as written; clipworks does
    the same, so that files written by transformers 4 (the releases') give OpenCLIP's ids. For NLLB, a text ending
    in a character the normalizer deletes differs from running the file as written."""
    path = shutil.copytree(dirs[family], tmp_path / family)
    _as_transformers_4_wrote_it(path, family)
    texts = HOSTILE + ["x\u200b", "a \u200b\u200e", "\u2581\u2581 ¨ \u200b"]
    tok, ref = ours(path, family), reference(path, family)
    assert torch.equal(tok(texts), ref(texts))
    as_written = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    as_written.encode_special_tokens = True
    rows = as_written.encode_batch([clean(t, FAMILIES[family][1]) for t in texts], add_special_tokens=False)
    differ = [t for t, row in zip(texts, rows) if row.ids[:20] != tok.encode(t)[:20]]
    assert bool(differ) == (family == "nllb"), differ


def test_errors_name_the_problem(dirs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer.json and no SentencePiece model \(spiece.model, "
                                                r"sentencepiece.bpe.model, tokenizer.model\) in .*empty"):  # fmt: skip
        HFTokenizer(empty)
    with pytest.raises(FileNotFoundError, match="in .*empty"):
        load_hf_tokenizer(TokenizerConfig(kind="hf", source=str(empty)))
    with pytest.raises(FileNotFoundError, match="neither a directory nor a hub repository id"):
        load_hf_tokenizer(TokenizerConfig(kind="hf", source=str(tmp_path / "no" / "such" / "dir")))
    with pytest.raises(ValueError, match="unknown text cleaning 'upper'"):
        HFTokenizer(dirs["siglip"], clean="upper")
    with pytest.raises(ValueError, match="unknown text cleaning 'upper'"):
        TokenizerConfig(kind="hf", source="x", clean="upper")
    for bad in (0, 1, "64", True):
        with pytest.raises(ValueError, match="context_length must be an int >= 2"):
            ours(dirs["xlm_roberta"], "xlm_roberta")(["x"], context_length=bad)
    with pytest.raises(ValueError, match="texts must be a str or a sequence of str"):
        ours(dirs["siglip"], "siglip")([b"bytes"])
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 400\)"):
        ours(dirs["siglip"], "siglip").decode([5, 400])
    xlmr_spm = tmp_path / "xlmr-spm"  # a fairseq SentencePiece model: its ids are offset, only tokenizer.json says how
    shutil.copytree(dirs["mt5"], xlmr_spm)
    (xlmr_spm / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "XLMRobertaTokenizer"}))
    with pytest.raises(ValueError, match="T5-style tokenizers only.*XLMRobertaTokenizer"):
        HFTokenizer(xlmr_spm)


def test_tokenizers_are_shared_and_built_once(dirs):
    cfg = TokenizerConfig(kind="hf", source=str(dirs["siglip"]), clean="canonicalize", context_length=64)
    first = load_hf_tokenizer(cfg)
    assert load_hf_tokenizer(cfg) is first and load_hf_tokenizer(cfg, context_length=16) is not first
    assert get_tokenizer("ViT-B-32") is clipworks.tokenizer.default_tokenizer()
    assert get_tokenizer("ViT-B-32", context_length=20) is get_tokenizer("ViT-B-32", context_length=20)


def _tiny_model(tokenizer_source, family: str = "siglip"):
    """A tiny CLIP (one OpenCLIP can build at any size) carrying a Hugging Face tokenizer: the tokenizer travels
    with the weights whatever the architecture."""
    torch.manual_seed(0)
    cfg = tiny_config(clipworks.get_preset("ViT-B-32"))
    context, mode = FAMILIES[family]
    model = clipworks.CLIP(replace(cfg, text=replace(cfg.text, context_length=context))).eval()
    perturb_(model)
    model.tokenizer_config = TokenizerConfig("hf", str(tokenizer_source), mode, context)
    return model


@pytest.mark.parametrize("family", ["siglip", "mt5"])
def test_checkpoints_carry_their_tokenizer(family, dirs, tmp_path):
    model = _tiny_model(dirs[family], family)
    expected = reference(dirs[family], family)(HOSTILE)
    native = clipworks.save_pretrained(model, tmp_path / "native")
    saved = json.loads((native / "config.json").read_text())["tokenizer"]
    assert saved == {**model.tokenizer_config.to_dict(), "source": None}
    loaded = clipworks.create_model(f"local-dir:{native}")
    assert loaded.tokenizer_config.source == str(native)
    for name in (loaded, f"local-dir:{native}"):
        assert torch.equal(get_tokenizer(name)(HOSTILE), expected)

    oc_dir = clipworks.save_pretrained(model, tmp_path / "oc", format="open_clip")
    text_cfg = json.loads((oc_dir / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
    assert text_cfg["hf_tokenizer_name"] == str(dirs[family].resolve())  # a local source is named by its path
    assert text_cfg["tokenizer_kwargs"] == {"clean": "canonicalize"}
    assert torch.equal(open_clip.get_tokenizer(f"local-dir:{oc_dir}")(HOSTILE), expected)  # OpenCLIP reads it too
    assert torch.equal(get_tokenizer(f"local-dir:{oc_dir}")(HOSTILE), expected)
    reloaded = clipworks.create_model(f"local-dir:{oc_dir}")
    again = clipworks.save_pretrained(reloaded, tmp_path / "oc2", format="open_clip")
    name = json.loads((again / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]["hf_tokenizer_name"]
    assert name == text_cfg["hf_tokenizer_name"]  # a directory's own config keeps naming its tokenizer


def test_saving_without_the_tokenizer_files_warns_and_names_the_source(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "home" / "hub"))
    model = _tiny_model("timm/ViT-B-16-SigLIP")  # offline, nothing cached
    with pytest.warns(UserWarning, match="tokenizer's files were not copied"):
        out = clipworks.save_pretrained(model, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["tokenizer"]["source"] == "timm/ViT-B-16-SigLIP"


def test_tokenizer_config_of_dir_for_every_layout(dirs, tmp_path):
    cfg = _tiny_model("unused").config  # context length 64
    oc = tmp_path / "oc"
    oc.mkdir()
    tok = TokenizerConfig(kind="hf", source="timm/ViT-B-16-SigLIP", clean="canonicalize", context_length=64)
    (oc / "open_clip_config.json").write_text(json.dumps({"model_cfg": config_to_open_clip(cfg, tok)}))
    assert tokenizer_config_of_dir(oc, cfg) == tok  # no files beside it: hf_tokenizer_name
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(dirs["siglip"] / name, oc / name)
    assert tokenizer_config_of_dir(oc, cfg).source == str(oc)
    hf = tmp_path / "hf"
    hf.mkdir()
    text_config = {"max_position_embeddings": 64}
    (hf / "config.json").write_text(json.dumps({"model_type": "siglip", "text_config": text_config}))
    assert tokenizer_config_of_dir(hf, cfg) == TokenizerConfig("hf", str(hf), "canonicalize", 64)
    (hf / "config.json").write_text(json.dumps({"model_type": "clip", "text_config": {"max_position_embeddings": 50}}))
    assert tokenizer_config_of_dir(hf, cfg) == TokenizerConfig(context_length=50)
    model_cfg = {"text_cfg": {"hf_tokenizer_name": "facebook/xlm-v-base"}}
    assert tokenizer_from_open_clip(model_cfg) == TokenizerConfig("hf", "facebook/xlm-v-base", "whitespace", 77)
    assert config_to_open_clip(cfg, tokenizer_from_open_clip(model_cfg))["text_cfg"]["hf_tokenizer_name"] == (
        "facebook/xlm-v-base")  # fmt: skip
    nllb = {"text_cfg": {"hf_tokenizer_name": "n", "tokenizer_kwargs": {"language": "fra_Latn"}}}
    assert tokenizer_from_open_clip(nllb).language == "fra_Latn"
    clipa = {"text_cfg": {"hf_tokenizer_name": "b", "tokenizer_kwargs": {"strip_sep_token": True}}}
    assert tokenizer_from_open_clip(clipa).strip_sep_token
    assert config_to_open_clip(cfg, tokenizer_from_open_clip(clipa))["text_cfg"]["tokenizer_kwargs"] == {
        "strip_sep_token": True}  # fmt: skip
    with pytest.raises(ValueError, match="tokenizer_mode"):
        tokenizer_from_open_clip({"text_cfg": {"hf_tokenizer_name": "b", "tokenizer_mode": "clips"}})


def test_get_tokenizer_sources():
    model = clipworks.create_model(clipworks.get_preset("ViT-B-32"))
    assert isinstance(get_tokenizer(model), Tokenizer)
    with pytest.raises(ValueError, match="a CLIPConfig alone does not say which tokenizer its 32000-token"):
        get_tokenizer(clipworks.get_preset("ViT-B-16-SigLIP"))
    with pytest.raises(ValueError, match=r"unknown keyword arguments \['clean'\]"):
        get_tokenizer("ViT-B-32", clean="lower")
    with pytest.raises(ValueError, match="only NLLB tokenizers take a language"):
        get_tokenizer("ViT-B-32", language="fra_Latn")
    assert get_tokenizer("ViT-B-32", context_length=10)("a cat").shape == (1, 10)


def test_hub_downloads_only_the_tokenizer_and_works_offline_afterwards(dirs, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from clipworks import hf_tokenizer, hub
    from fakehub import serving

    siglip_files = {p.name: p.read_bytes() for p in dirs["siglip"].iterdir()}
    model = _tiny_model("timm/ViT-B-16-SigLIP")
    monkeypatch.setattr(hf_tokenizer, "_HUB_DIRS", {})
    expected = reference(dirs["siglip"], "siglip")(HOSTILE)
    with serving(monkeypatch, tmp_path / "home") as server:
        server.add_repo("timm/ViT-B-16-SigLIP", {**siglip_files, "open_clip_model.safetensors": b"x" * 100})
        server.add_repo("google/mt5-base", {p.name: p.read_bytes() for p in dirs["mt5"].iterdir()})
        server.add_repo("org/no-tokenizer", {"config.json": b"{}"})
        assert torch.equal(get_tokenizer("ViT-B-16-SigLIP")(HOSTILE), expected)  # the preset names the repository
        assert torch.equal(get_tokenizer(model)(HOSTILE), expected)
        assert server.gets("timm/ViT-B-16-SigLIP", "tokenizer.json") and not server.gets(
            "timm/ViT-B-16-SigLIP", "open_clip_model.safetensors")  # fmt: skip
        mt5 = hub.download_tokenizer("google/mt5-base")
        assert sorted(p.name for p in mt5.iterdir()) == ["spiece.model", "tokenizer_config.json"]
        assert torch.equal(get_tokenizer("ViT-L-14-worldwide")(HOSTILE), reference(dirs["mt5"], "mt5")(HOSTILE))
        with pytest.raises(FileNotFoundError, match=r"'org/no-tokenizer'.*no tokenizer files.*\['config.json'\]"):
            hub.download_tokenizer("org/no-tokenizer")
        assert hub.repo_has_tokenizer("org/no-tokenizer") is False
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(hf_tokenizer, "_HUB_DIRS", {})
        requests = len(server.requests)
        assert torch.equal(get_tokenizer("ViT-B-16-SigLIP")(HOSTILE), expected)  # from the cache
        assert len(server.requests) == requests
        with pytest.raises(hub.HubUnavailableError, match="the tokenizer of 'timm/ViT-B-16-SigLIP2'.*offline"):
            get_tokenizer("ViT-B-16-SigLIP2")


def test_hf_hub_checkpoint_takes_its_tokenizer_from_its_repository(dirs, tmp_path, monkeypatch):
    from clipworks import hf_tokenizer
    from fakehub import serving

    model = _tiny_model(dirs["siglip"])
    exported = clipworks.save_pretrained(model, tmp_path / "export", format="open_clip")
    files = {p.name: p.read_bytes() for p in exported.iterdir()}
    monkeypatch.setattr(hf_tokenizer, "_HUB_DIRS", {})
    with serving(monkeypatch, tmp_path / "home") as server:
        server.add_repo("org/tiny-siglip", files)
        loaded = clipworks.create_model("hf-hub:org/tiny-siglip")
        assert loaded.tokenizer_config.source == "org/tiny-siglip"  # not the local path its config names
        assert not server.gets("org/tiny-siglip", "tokenizer.json")  # create_model fetches no tokenizer
        expected = reference(dirs["siglip"], "siglip")(HOSTILE)
        assert torch.equal(get_tokenizer(loaded)(HOSTILE), expected)
        assert torch.equal(get_tokenizer("hf-hub:org/tiny-siglip")(HOSTILE), expected)


def test_cli_tokenize(dirs, tmp_path, capsys):
    out = clipworks.save_pretrained(_tiny_model(dirs["nllb"], "nllb"), tmp_path / "nllb")
    tok = ours(dirs["nllb"], "nllb", language="fra_Latn")
    assert cli.main(["tokenize", "a photo of a cat", "--model", f"local-dir:{out}", "--language", "fra_Latn"]) == 0
    ids = [tok.sot_token_id, *tok.encode("a photo of a cat"), tok.eot_token_id]
    assert capsys.readouterr().out.strip() == f"'a photo of a cat': {ids}"
    assert cli.main(["tokenize", "x", "--model", f"local-dir:{out}", "--language", "xx_Latn"]) == 2
    assert "unknown language 'xx_Latn'" in capsys.readouterr().err
    assert cli.main(["tokenize", "a cat", "--context-length", "5"]) == 0  # CLIP's BPE, the default model
    assert capsys.readouterr().out.strip() == f"'a cat': {Tokenizer(context_length=5)('a cat')[0, :4].tolist()}"
