"""clipworks' evaluation metrics against the installed CLIP_benchmark's on the same features, with exact ties and
duplicate images: zero-shot top-k and mean per-class recall, retrieval recall@k with several captions per image,
and the linear probe's protocol (AdamW, few-shot sampling, weight-decay search on a validation split)."""

from __future__ import annotations

import builtins
import os
import re

import pytest
import torch

pytest.importorskip("clip_benchmark")
zs_ref = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
retrieval_ref = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
probe_ref = pytest.importorskip("clip_benchmark.metrics.linear_probe")
balanced_accuracy_score = pytest.importorskip("sklearn.metrics").balanced_accuracy_score

from clipworks.eval import metrics  # noqa: E402
from clipworks.eval.linear_probe import AdamWProtocol, fit_linear_adamw, linear_probe_adamw  # noqa: E402


@pytest.fixture(autouse=True)
def reference_on_cpu(monkeypatch):
    """CLIP_benchmark's metrics as they run on the CPU: one thread (tiny problems run faster so on a shared
    CPU), and the float() of a one-element array its `accuracy` takes, which numpy 2 refuses."""

    def float_of_array(x):
        return builtins.float(x.reshape(-1)[0]) if hasattr(x, "reshape") else builtins.float(x)

    monkeypatch.setattr(zs_ref, "float", float_of_array, raising=False)  # module globals shadow builtins
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tied(n: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    """n unit vectors with four entries +-1/2 and the rest 0: normalising one again changes no bit, and dot
    products are multiples of 1/4, so scores tie everywhere."""
    g = torch.Generator().manual_seed(seed)
    where = torch.rand(n, dim, generator=g).argsort(dim=1)[:, :4]  # (n, 4) distinct columns
    signs = torch.randint(0, 2, (n, 4), generator=g).float() * 2 - 1
    return torch.zeros(n, dim).scatter_(1, where, 0.5 * signs)


def _sliced_recall(scores: torch.Tensor, positive: torch.Tensor, k: int, largest_k: int) -> float:
    """Recall@k from the first k of one topk(largest_k): clipworks' computation before issue 18."""
    top = scores.topk(largest_k, dim=1).indices[:, :k]
    return positive.gather(1, top).any(dim=1).double().mean().item()


# Zero-shot classification


def test_zeroshot_metrics_equal_clip_benchmark_with_ties():
    g = torch.Generator().manual_seed(1)
    logits = torch.randint(0, 4, (300, 12), generator=g).float()  # (N, C) four values: ties in every row
    labels = torch.randint(0, 12, (300,), generator=g)
    logits[torch.arange(300), labels] += 1  # better than chance, the true class often tied with others
    logits[200:], labels[200:] = logits[:100], labels[:100]  # duplicate images
    ours = metrics.classification_metrics(logits, labels)
    acc1, acc5 = zs_ref.accuracy(logits, labels, topk=(1, 5))
    assert 0.05 < ours["top1"] < ours["top5"] < 0.95
    assert (ours["top1"], ours["top5"]) == (acc1, acc5)  # both count / N in float64: equal counts, equal floats
    assert ours["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(labels, logits.argmax(1)), abs=1e-12)
    # Unlike retrieval, top-1 is the first of topk(5): topk(1) alone breaks the ties otherwise, and counts otherwise.
    assert _sliced_recall(logits, torch.nn.functional.one_hot(labels, 12).bool(), 1, 1) != acc1

    # Below 5 classes CLIP_benchmark takes topk(1) alone, and reports acc5 as NaN (clipworks: None).
    few, few_labels = logits[:, :3], labels % 3
    ours = metrics.classification_metrics(few, few_labels)
    (acc1,) = zs_ref.accuracy(few, few_labels, topk=(1,))
    assert ours["top1"] == acc1 and ours["top5"] is None
    assert ours["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(few_labels, few.argmax(1)), abs=1e-12)


# Retrieval


class _PassThrough(torch.nn.Module):
    """A "model" whose images and (tokenised) texts are already their features."""

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def encode_text(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _coco_like(n: int = 30, seed: int = 2):
    """Tied image features (the last 10 duplicate the first 10) with 1 to 5 captions each; half the captions
    are their image's own feature (so they tie between an image and its duplicate), half random."""
    image_f = _tied(n, seed=seed)
    image_f[n - 10 :] = image_f[:10]
    caption_image = torch.tensor([i for i in range(n) for _ in range(1 + i % 5)])
    text_f = _tied(len(caption_image), seed=seed + 1)
    own = torch.rand(len(caption_image), generator=torch.Generator().manual_seed(seed)) < 0.5
    text_f[own] = image_f[caption_image[own]]
    return image_f, text_f, caption_image


def test_retrieval_recall_equals_clip_benchmark_with_ties_and_duplicate_images():
    image_f, text_f, caption_image = _coco_like()
    n, t = len(image_f), len(text_f)
    # CLIP_benchmark's evaluate on batches of 8 images, each with its list of captions ("texts" are features)
    batches = [(image_f[i : i + 8], [list(text_f[caption_image == j]) for j in range(i, min(i + 8, n))])
               for i in range(0, n, 8)]  # fmt: skip
    ks = [1, 2, 3, 5, 10, n]
    ref = retrieval_ref.evaluate(_PassThrough(), batches, torch.stack, "cpu", amp=False, recall_k_list=ks)
    ours = metrics.retrieval_metrics(image_f, text_f, caption_image, ks)
    for k in ks:  # CLIP_benchmark averages in float32: a tolerance of a tenth of one query tells counts apart
        assert ours[f"text_to_image@{k}"] == pytest.approx(ref[f"image_retrieval_recall@{k}"], abs=0.1 / t)
        assert ours[f"image_to_text@{k}"] == pytest.approx(ref[f"text_retrieval_recall@{k}"], abs=0.1 / n)
    assert 0 < ours["text_to_image@1"] < ours["text_to_image@10"] < 1 and ours[f"text_to_image@{n}"] == 1

    # The ties matter: the first k of the top 10 (clipworks before issue 18) miss or find other queries' images.
    scores = text_f @ image_f.t()  # (T, N)
    positive = torch.zeros(t, n, dtype=torch.bool)
    positive[torch.arange(t), caption_image] = True
    sliced = [_sliced_recall(s, p, k, 10) for s, p in ((scores, positive), (scores.t(), positive.t())) for k in ks[:5]]
    assert sliced != [ours[f"{d}@{k}"] for d in ("text_to_image", "image_to_text") for k in ks[:5]]


def test_retrieval_k_beyond_the_candidates():
    image_f, text_f, caption_image = _coco_like()
    n = len(image_f)
    ours = metrics.retrieval_metrics(image_f, text_f, caption_image, (n + 1,))
    assert ours[f"text_to_image@{n + 1}"] is None  # more than the 30 images: no value, where CLIP_benchmark fails
    scores = text_f @ image_f.t()
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), caption_image] = True
    with pytest.raises(RuntimeError):
        retrieval_ref.recall_at_k(scores, positive, k=n + 1)
    # image to text: 90 captions, so k = 31 is fine on both sides
    ref = (retrieval_ref.batchify(retrieval_ref.recall_at_k, scores.T, positive.T, 8, "cpu", k=n + 1) > 0)
    assert ours[f"image_to_text@{n + 1}"] == pytest.approx(ref.float().mean().item(), abs=0.1 / n)
    with pytest.raises(ValueError, match="at least 1"):
        metrics.retrieval_metrics(image_f, text_f, caption_image, (0, 5))


# Linear probe


@pytest.fixture
def probe_on_cpu(monkeypatch):
    """CLIP_benchmark's linear probe insists on CUDA (`assert device == 'cuda'`, `.cuda()`, `DataParallel`):
    those become no-ops, and "cuda" the CPU."""
    to = torch.Tensor.to

    def to_cpu(self, *args, **kwargs):
        return to(self, *("cpu" if isinstance(a, str) and a == "cuda" else a for a in args), **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to_cpu)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **kw: self)
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *a, **kw: self)
    monkeypatch.setattr(torch.nn, "DataParallel", lambda module, device_ids=None: module)


@pytest.fixture
def reference_probe(probe_on_cpu, tmp_path, capsys):
    """CLIP_benchmark's linear-probe `evaluate` on given features, without mixed precision. The features are
    given as its feature cache, so it never featurises. Returns its metrics and the validation top-1 it prints
    for each weight decay it tries."""

    def run(train, test, val, protocol: AdamWProtocol):
        name = f"run{len(os.listdir(tmp_path))}"
        (tmp_path / name).mkdir()
        for split, (x, y) in {"train": train, "test": test, **({"val": val} if val else {})}.items():
            torch.save(x, tmp_path / name / f"features_{split}.pt")
            torch.save(y, tmp_path / name / f"targets_{split}.pt")
        capsys.readouterr()
        out = probe_ref.evaluate(None, None, None, protocol.fewshot_k, protocol.batch_size, 0, protocol.lr,
                                 protocol.epochs, name, protocol.seed, str(tmp_path), "cuda",
                                 val_dataloader=object() if val else None, amp=False, verbose=True)  # fmt: skip
        printed = re.findall(r"Valid accuracy with weight_decay (\S+): (\S+)", capsys.readouterr().out)
        return out, {float(wd): float(top1) for wd, top1 in printed}

    return run


def _clustered(n: int, seed: int, classes: int = 8, dim: int = 16):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes  # every class present, so the largest label is classes - 1
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(100))
    return centres[labels] + 2.5 * torch.randn(n, dim, generator=g), labels


@pytest.fixture
def probe_data():
    train_x, train_y = _clustered(200, seed=1)
    train_x[100:130], train_y[100:130] = train_x[:30], train_y[:30]  # duplicate images
    return (train_x, train_y), _clustered(100, seed=2), _clustered(48, seed=3)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pin_memory without an accelerator
@pytest.mark.parametrize("fewshot_k", [-1, 4])
def test_linear_probe_equals_clip_benchmark_with_a_validation_set(reference_probe, probe_data, fewshot_k):
    train, test, val = probe_data
    protocol = AdamWProtocol(fewshot_k=fewshot_k, epochs=4, lr=0.1, batch_size=32, seed=3)
    torch.manual_seed(protocol.seed)  # CLIP_benchmark's command line seeds the global generator first
    ref, ref_validation = reference_probe(train, test, val, protocol)
    ours = linear_probe_adamw(*train, *test, 8, *val, protocol=protocol)
    assert ours.validation == ref_validation and len(ours.validation) > 7  # each weight decay tried, same top-1
    assert ours.weight_decay == ref["weight_decay"]
    assert (ours.top1, ours.top5) == (ref["lp_acc1"], ref["lp_acc5"])
    assert ours.mean_per_class_recall == pytest.approx(ref["lp_mean_per_class_recall"], abs=1e-12)
    assert 0.2 < ours.top1 < ours.top5 < 1


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_linear_probe_equals_clip_benchmark_with_val_proportion_and_without_validation(reference_probe, probe_data):
    train, test, _ = probe_data
    protocol = AdamWProtocol(fewshot_k=3, epochs=3, lr=0.05, batch_size=16, seed=5)
    # `--val_proportion 0.2`: CLIP_benchmark splits with random_split after seeding, then featurises each part
    torch.manual_seed(protocol.seed)
    tr, va = (s.indices for s in torch.utils.data.random_split(range(len(train[0])), [0.8, 0.2]))
    ref, ref_validation = reference_probe((train[0][tr], train[1][tr]), test, (train[0][va], train[1][va]), protocol)
    ours = linear_probe_adamw(*train, *test, 8, val_fraction=0.2, protocol=protocol)
    assert ours.validation == ref_validation and ours.weight_decay == ref["weight_decay"]
    assert (ours.top1, ours.top5) == (ref["lp_acc1"], ref["lp_acc5"])

    # no validation set: weight decay 0, all training features
    protocol = AdamWProtocol(epochs=3, batch_size=16, seed=0)
    torch.manual_seed(protocol.seed)
    ref, _ = reference_probe(train, test, None, protocol)
    ours = linear_probe_adamw(*train, *test, 8, protocol=protocol)
    assert ours.validation == {} and ours.weight_decay == ref["weight_decay"] == 0
    assert (ours.top1, ours.top5) == (ref["lp_acc1"], ref["lp_acc5"])
    assert ours.mean_per_class_recall == pytest.approx(ref["lp_mean_per_class_recall"], abs=1e-12)

    with pytest.raises(ValueError, match="fewer than 40"):
        linear_probe_adamw(*train, *test, 8, protocol=AdamWProtocol(fewshot_k=40))


@pytest.mark.parametrize("weight_decay", [0.0, 1e-3, 0.3])
def test_linear_probe_trains_clip_benchmarks_weights(probe_on_cpu, probe_data, weight_decay):
    (x, y), _, _ = probe_data
    protocol = AdamWProtocol(epochs=4, lr=0.1, batch_size=32, seed=7)
    state = torch.get_rng_state()
    ours = fit_linear_adamw(x, y, 8, weight_decay, protocol)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is left alone
    loader = torch.utils.data.DataLoader(probe_ref.FeatureDataset(x, y), batch_size=32, shuffle=True)
    ref = probe_ref.train(loader, 16, 8, weight_decay, 0.1, 4, False, "cuda", 7)
    # the same operations in the same order on the CPU: the same bits
    assert torch.equal(ours.weight, ref.weight) and torch.equal(ours.bias, ref.bias)
