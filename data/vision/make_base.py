"""Make the embedded base model of the book's small scale: theta_0, the ViT pretrained on the mix
of images no task owns (toolkit.experiments.vision.pretrain; 3000 AdamW steps, ~3 min on 2 cores).

    python data/vision/make_base.py

Writes vit_base_small.pt ({"recipe": the configuration as JSON, "state_dict": the backbone}) and
prints its sha256, which toolkit/data.py (EMBEDDED_MODELS) and the data card vit_base_small.md
state. The book loads this file instead of retraining while its recipe is the setup's; a change of
the recipe makes toolkit train theta_0 again (and a test fail until this script is rerun).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from toolkit import data as D  # noqa: E402
from toolkit.atomic import atomic_file  # noqa: E402
from toolkit.experiments import vision as E  # noqa: E402

if __name__ == "__main__":
    torch.set_num_threads(2)
    s = E.setup("small")
    state = E.pretrain(s)
    out = HERE / f"{E.EMBEDDED_BASE}.pt"
    with atomic_file(out) as tmp:
        torch.save({"recipe": json.dumps(E.base_recipe(s), sort_keys=True), "state_dict": state}, tmp)
    print(out.name, out.stat().st_size, "bytes, sha256", D.sha256(out))
