"""Evaluation: zero-shot classification, retrieval, linear probes, compositional probes, scoring heads, reports.

- `prompts`: OpenAI's ImageNet class names and templates; zero-shot class embeddings.
- `classify`: classify images among class names, or rank a caption bank (`clipworks classify`).
- `sources`: evaluation sets named by `--data` strings (class folders, csv/tsv, COCO captions, synthetic).
- `embed`: image and text features, batched, cached on disk, split across `torchrun` ranks.
- `metrics`, `linear_probe`, `tasks`: the metrics (CLIP_benchmark's definitions) and the evaluations.
- `scoring`: a linear or MLP scoring head on image embeddings (`clipworks eval fit-score`, `clipworks score`).
- `report`: results.json, results.md and the PNG figures. `commands`: the `clipworks` subcommands.
- `suite`, `suite_report`, `benchmark`: the resumable suite of models x datasets (CLIP_benchmark's collections),
  its results.csv / results.md / plots, and `clipworks benchmark`.
"""
