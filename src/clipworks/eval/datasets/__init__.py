"""Adapters for published evaluation sets in the layouts they are distributed in, one module per format.

Each adapter reads a parsed `sources.Spec` (the scheme's options filled in) into a `sources.Classification`,
`sources.Captioned` or `sources.WithNegatives`; `sources.load_classification`, `load_captioned` and
`load_with_negatives` dispatch to them by scheme.
"""

from . import cifar, imagenet, mnist, stl10, wds_benchmark

CLASSIFICATION = {
    "imagenet": imagenet.load_classification,
    "cifar10": cifar.load_cifar10,
    "cifar100": cifar.load_cifar100,
    "mnist": mnist.load_classification,
    "fashion-mnist": mnist.load_classification,
    "wds-benchmark": wds_benchmark.load_classification,
    "stl10": stl10.load_classification,
}
