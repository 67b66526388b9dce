"""Evaluation: zero-shot classification, retrieval, linear probes, compositional probes, scoring heads, reports.

- `prompts`: OpenAI's ImageNet class names and templates; zero-shot class embeddings.
- `classify`: classify images among class names, or rank a caption bank (`clipworks classify`).
- `sources`: evaluation sets named by `--data` strings (class folders, csv/tsv, COCO captions, synthetic).
- `embed`: image and text features, batched, cached on disk, split across `torchrun` ranks.
- `metrics`, `linear_probe`, `tasks`: the metrics (CLIP_benchmark's definitions) and the evaluations.
- `scoring`: a linear or MLP scoring head on image embeddings (`clipworks eval fit-score`, `clipworks score`).
- `report`: results.json, results.md and the PNG figures. `commands`: the `clipworks` subcommands.
- `suite`, `suite_tasks`, `suite_report`, `benchmark`: the resumable suite of models x datasets x tasks
  (CLIP_benchmark's collections and tasks), its results.csv / results.md / plots, and `clipworks benchmark`.
- `captioning`: BLEU, ROUGE-L and CIDEr as pycocoevalcap computes them (the suite's captioning task).
- `phrase_caption`: captions by matching phrase banks, CLIP Interrogator's way (`clipworks caption` without CoCa).
- `datasets/`: adapters for published sets in their distributed layouts.
"""
