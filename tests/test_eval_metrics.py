"""Evaluation metrics against the references on the same features: CLIP_benchmark's zero-shot classification and
retrieval, scikit-learn's logistic regression, torchmetrics' CLIP score definition."""

from __future__ import annotations

import builtins
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from clipworks.eval import metrics, tasks
from clipworks.eval.embed import Embedder
from clipworks.eval.linear_probe import WEIGHT_DECAYS, AdamWProtocol, fit_logistic, linear_probe
from clipworks.eval.sources import Captioned, Classification, ImageSet, WithNegatives

# A fake CLIP whose features are looked up in tables: the same fake goes through clipworks' evaluation and
# CLIP_benchmark's, so both see identical features and any difference is a difference in the metrics.


class TableTokenizer:
    """Texts to ids: each distinct text gets the next id; id i is row i of the text feature table."""

    def __init__(self):
        self.ids: dict[str, int] = {}

    def __call__(self, texts) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        return torch.tensor([[self.ids.setdefault(t, len(self.ids))] for t in texts])  # (T, 1)


class TableModel(torch.nn.Module):
    """`encode_image` of an (N, 1, 1, 1) batch of image indices and `encode_text` of (T, 1) ids: table rows."""

    def __init__(self, image_features: torch.Tensor, text_dim: int | None = None, seed: int = 0, texts: int = 5000):
        super().__init__()
        dim = image_features.shape[1]
        self.image_table = image_features
        self.text_table = torch.randn(texts, text_dim or dim, generator=torch.Generator().manual_seed(seed))
        self.config = SimpleNamespace(embed_dim=dim)
        self.logit_scale = torch.nn.Parameter(torch.tensor(100.0).log())

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        f = self.image_table[images.view(len(images), -1)[:, 0].long()]
        return F.normalize(f, dim=-1) if normalize else f

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        f = self.text_table[tokens[:, 0]]
        return F.normalize(f, dim=-1) if normalize else f


class IndexImages(ImageSet):
    """n "images" that are their own index + `offset` (a (1, 1, 1) tensor); those in `broken` fail to load."""

    def __init__(self, n: int, broken: tuple[int, ...] = (), offset: int = 0):
        self.n, self.broken, self.offset = n, set(broken), offset

    def __len__(self) -> int:
        return self.n

    def load(self, i: int):
        if i in self.broken:
            from clipworks.data.decode import ImageDecodeError

            raise ImageDecodeError(f"image {i} is broken")
        return torch.full((1, 1, 1), float(i + self.offset))

    def name(self, i: int) -> str:
        return str(i + self.offset)

    def fingerprint(self) -> str:
        return f"index:{self.n}:{sorted(self.broken)}:{self.offset}"


def identity(x):
    """The image transform for `IndexImages`."""
    return x


class _Labelled(torch.utils.data.Dataset):
    def __init__(self, labels, classes):
        self.labels, self.classes = labels, classes

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return torch.full((1, 1, 1), float(i)), self.labels[i]


def _clustered(n: int, classes: int, dim: int, noise: float, seed: int = 0):
    """Features near one of `classes` random centres (so that metrics are neither 0 nor 1), and the labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    centres = torch.randn(classes, dim, generator=g)
    return centres[labels] + noise * torch.randn(n, dim, generator=g), labels


def _numpy2_float(x):
    """float() of a one-element array, which numpy 2 no longer allows and CLIP_benchmark 1.6's `accuracy` does."""
    return builtins.float(x.reshape(-1)[0]) if hasattr(x, "reshape") else builtins.float(x)


def test_zeroshot_equals_clip_benchmark(monkeypatch):
    from clip_benchmark.metrics import zeroshot_classification as cb

    monkeypatch.setattr(cb, "float", _numpy2_float, raising=False)  # module globals shadow builtins

    n, c, dim = 120, 12, 16
    image_f, labels = _clustered(n, c, dim, noise=2.0)
    names = [f"class {k}" for k in range(c)]
    model, tokenizer = TableModel(image_f), TableTokenizer()
    model.text_table[: c * 2] = torch.cat([image_f[labels == k].mean(0, keepdim=True) for k in range(c)]).repeat_interleave(2, 0)
    tokenizer([f"{t} {name}" for name in names for t in ("a", "the")])  # fix the ids before either side runs
    loader = torch.utils.data.DataLoader(_Labelled(labels.tolist(), names), batch_size=32)
    ref = cb.evaluate(model, loader, tokenizer, names, ["a {c}", "the {c}"], "cpu", amp=False)

    data = Classification(IndexImages(n), labels.tolist(), names)
    ours = tasks.zeroshot(Embedder(model, identity, tokenizer, batch_size=32, show_progress=False), data,
                          ["a {}", "the {}"]).metrics  # fmt: skip
    assert 0.05 < ours["top1"] < 0.95 and ours["top5"] > ours["top1"]
    assert ours["top1"] == pytest.approx(ref["acc1"], abs=1e-12)
    assert ours["top5"] == pytest.approx(ref["acc5"], abs=1e-12)
    assert ours["mean_per_class_recall"] == pytest.approx(ref["mean_per_class_recall"], abs=1e-9)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_classification_metrics_with_absent_classes_and_few_classes():
    from sklearn.metrics import balanced_accuracy_score

    logits = torch.randn(50, 7, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 4, (50,), generator=torch.Generator().manual_seed(2))  # classes 4..6 never true
    out = metrics.classification_metrics(logits, labels)
    assert out["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(labels, logits.argmax(1)), abs=1e-9)
    assert metrics.classification_metrics(logits[:, :3], labels.clamp(max=2))["top5"] is None  # 3 classes: no top-5


def test_retrieval_equals_clip_benchmark_with_several_captions_per_image():
    from clip_benchmark.metrics import zeroshot_retrieval as cb

    n, dim = 40, 8
    g = torch.Generator().manual_seed(3)
    image_f = torch.randn(n, dim, generator=g)
    per_image = [1 + i % 3 for i in range(n)]  # 1, 2 or 3 captions
    captions = [[f"image {i} caption {j}" for j in range(k)] for i, k in enumerate(per_image)]
    flat = [c for cs in captions for c in cs]
    caption_image = [i for i, cs in enumerate(captions) for _ in cs]
    model, tokenizer = TableModel(image_f), TableTokenizer()
    tokenizer(flat)
    # each caption near its image, with noise, so that recall@1 is strictly between 0 and 1
    model.text_table[: len(flat)] = image_f[caption_image] + 1.2 * torch.randn(len(flat), dim, generator=g)

    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return n

        def __getitem__(self, i):
            return torch.full((1, 1, 1), float(i)), captions[i]

    loader = torch.utils.data.DataLoader(Pairs(), batch_size=16, collate_fn=lambda b: (torch.stack([x for x, _ in b]), [y for _, y in b]))
    ref = cb.evaluate(model, loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
    ours = tasks.retrieval(Embedder(model, identity, tokenizer, show_progress=False),
                           Captioned(IndexImages(n), flat, caption_image)).metrics  # fmt: skip
    assert 0.0 < ours["text_to_image@1"] < 1.0 and 0.0 < ours["image_to_text@1"] < 1.0
    # CLIP_benchmark: "image_retrieval" = text to image, "text_retrieval" = image to text. It averages in float32,
    # so equal counts give values 1e-8 apart; 1e-6 is far below one query's share (1/79).
    for k in (1, 5, 10):
        assert ours[f"text_to_image@{k}"] == pytest.approx(ref[f"image_retrieval_recall@{k}"], abs=1e-6)
        assert ours[f"image_to_text@{k}"] == pytest.approx(ref[f"text_retrieval_recall@{k}"], abs=1e-6)
    assert ours["captions"] == len(flat)


def test_retrieval_drops_unreadable_images_and_their_captions():
    image_f = torch.eye(4)
    model, tokenizer = TableModel(image_f), TableTokenizer()
    tokenizer(["c0", "c1", "c2", "c3"])
    model.text_table[:4] = torch.eye(4)
    ev = tasks.retrieval(Embedder(model, identity, tokenizer, show_progress=False),
                         Captioned(IndexImages(4, broken=(2,)), ["c0", "c1", "c2", "c3"], [0, 1, 2, 3]))  # fmt: skip
    assert ev.skipped == 1 and ev.metrics["captions"] == 3
    assert ev.metrics["text_to_image@1"] == 1.0 and ev.metrics["image_to_text@1"] == 1.0


@pytest.fixture
def one_thread():
    """Tiny problems run several times faster on one thread when the CPU is shared (OpenMP waits otherwise)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_linear_probe_matches_scikit_learn(one_thread):
    from sklearn.linear_model import LogisticRegression

    features, labels = _clustered(440, 5, 16, noise=2.5, seed=4)
    x, y, x_test, y_test = features[:240], labels[:240], features[240:], labels[240:]
    c = 0.05
    sk = LogisticRegression(C=c, max_iter=5000, tol=1e-10).fit(x.numpy(), y.numpy())
    ours = fit_logistic(x, y, 5, l2=1.0 / (c * len(x)))
    assert torch.allclose(ours.weight, torch.from_numpy(sk.coef_).double(), atol=1e-3)
    sk_acc = sk.score(x_test.numpy(), y_test.numpy())
    our_acc = (ours.logits(x_test).argmax(1) == y_test).double().mean().item()
    assert 0.3 < sk_acc < 0.99 and our_acc == pytest.approx(sk_acc, abs=0.01)

    result = linear_probe(x, y, x_test, y_test, 5, l2_grid=(1e-4, 1e-2, 1.0, 100.0))
    assert set(result.validation) == {1e-4, 1e-2, 1.0, 100.0}
    assert result.validation[result.l2] == max(result.validation.values())
    assert result.validation[100.0] < result.validation[result.l2]  # far too strong L2 is never chosen here
    assert result.top1 > 0.5


def test_linear_probe_eval_with_clip_benchmarks_protocol(one_thread):
    features, labels = _clustered(160, 4, 8, noise=1.5, seed=7)
    model, names = TableModel(features), [f"class {k}" for k in range(4)]
    embedder = Embedder(model, identity, TableTokenizer(), show_progress=False)
    train = Classification(IndexImages(120, broken=(5,)), labels[:120].tolist(), names)
    test = Classification(IndexImages(40, offset=120), labels[120:].tolist(), names)
    ev = tasks.linear_probe_eval(embedder, train, test, adamw=AdamWProtocol(fewshot_k=8, epochs=3, batch_size=16))
    assert ev.skipped == 1 and ev.metrics["top5"] is None  # 4 classes: no top-5
    assert 0.5 < ev.metrics["top1"] <= 1 and ev.metrics["weight_decay"] in WEIGHT_DECAYS
    assert 7 <= len([k for k in ev.metrics if k.startswith("val_top1@wd=")]) <= 15  # 7 first, then 2 a round
    with pytest.raises(ValueError, match="fewer than 40"):
        tasks.linear_probe_eval(embedder, train, test, adamw=AdamWProtocol(fewshot_k=40))
    with pytest.raises(ValueError, match="fewshot_k=0"):
        AdamWProtocol(fewshot_k=0)


def test_compositional_accuracy_counts_images_beating_every_negative():
    image = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    caption = F.normalize(torch.tensor([[1.0, 0.1], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    negatives = F.normalize(torch.tensor([[[0.0, 1.0], [1.0, 0.5]], [[1.0, 0.0], [0.0, 1.0]],
                                          [[1.0, 0.0], [1.0, 1.0]]]), dim=-1)  # fmt: skip
    mask = torch.tensor([[True, True], [True, True], [True, False]])
    out = metrics.compositional_accuracy(image, caption, negatives, mask, ["color", "relation"])
    # image 0 beats both; image 1 ties its first negative (a tie is not a win); image 2 beats its one negative
    assert out == {"accuracy": pytest.approx(2 / 3), "accuracy_color": pytest.approx(2 / 3), "accuracy_relation": 1.0}

    model, tokenizer = TableModel(torch.eye(3)), TableTokenizer()
    data = WithNegatives(IndexImages(3, broken=(1,)), ["t0", "t1", "t2"], [["n0", ""], ["n1", "n1b"], ["n2", ""]], ["a", "b"])
    ev = tasks.compositional(Embedder(model, identity, tokenizer, show_progress=False), data)
    assert ev.skipped == 1 and ev.metrics["chance"] == pytest.approx(0.5)


def test_clip_score_is_torchmetrics_definition():
    g = torch.Generator().manual_seed(6)
    image, text = torch.randn(30, 8, generator=g), torch.randn(30, 8, generator=g)
    scores = metrics.clip_score(image, text)
    cos = [float(image[i] @ text[i] / (image[i].norm() * text[i].norm())) for i in range(30)]
    assert scores.tolist() == pytest.approx([100 * max(c, 0.0) for c in cos], abs=1e-4)
    assert (scores == 0).any() and (scores > 0).any() and not math.isnan(scores.mean().item())


def test_progress_bars_fall_back_without_tqdm(monkeypatch):
    import sys

    from clipworks.eval.embed import progress

    items = [1, 2, 3]
    assert progress(items, 3, "x", enabled=False) is items
    assert list(progress(items, 3, "x", enabled=True)) == items  # a tqdm bar, on stderr
    monkeypatch.setitem(sys.modules, "tqdm", None)  # "import tqdm" now raises ImportError
    assert progress(items, 3, "x", enabled=True) is items
