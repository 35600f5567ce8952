"""The book's benchmarks, one thin module each over one shared pipeline (`pipeline.py`):

    python -m toolkit.experiments vision     --scale small --seed 0 --out results/vision.csv
    python -m toolkit.experiments text-add   --scale small --out results/text_add.csv
    python -m toolkit.experiments lm-domains --scale small --out results/lm_domains.csv
    python -m toolkit.experiments lm-remove  --scale small --out results/lm_remove.csv

Every module has `setup(scale, seed, **overrides)` -> a frozen settings dataclass, `run(setup)` ->
one tidy DataFrame (cached), and `summary(table)`. Merges go through the registry
(`toolkit.merge.METHODS`): a newly registered method appears in every table without other edits.
"""
