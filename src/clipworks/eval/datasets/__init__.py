"""Adapters for published evaluation sets in the layouts they are distributed in, one module per format.

Each adapter reads a parsed `sources.Spec` (the scheme's options filled in) into a `sources.Classification`,
`sources.MultiLabel`, `sources.Captioned` or `sources.WithNegatives`; `sources.load_classification`,
`load_multilabel`, `load_captioned` and `load_with_negatives` dispatch to them by scheme.
"""

from . import cifar, imagenet, mnist, objectnet, stl10, voc2007, wds_benchmark

CLASSIFICATION = {
    "imagenet": imagenet.load_classification,
    "cifar10": cifar.load_cifar10,
    "cifar100": cifar.load_cifar100,
    "mnist": mnist.load_classification,
    "fashion-mnist": mnist.load_classification,
    "wds-benchmark": wds_benchmark.load_classification,
    "stl10": stl10.load_classification,
    "objectnet": objectnet.load_classification,
    "voc2007": voc2007.load_classification,
}
MULTILABEL = {
    "voc2007-multilabel": voc2007.load_multilabel,
    "wds-benchmark": wds_benchmark.load_multilabel,
}
