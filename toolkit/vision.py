"""ViTs with one head per task: configs by scale, the task suite, and the training loops.

A task model is a shared timm VisionTransformer backbone (no classifier) plus its own linear
head. Only backbones are merged; each task keeps its head. Small scales train the backbone from
scratch on images that no task owns, with random quarter turns and inversions so it covers every
task's domain (the "pretrained" theta_0); `full` loads timm weights. Fine-tuning starts from a
linear probe (`linear_probe`), then trains head and backbone at separate rates (`fit`).
"""
from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from tqdm.auto import tqdm

from . import data as D
from .errors import MergeError


@dataclass(frozen=True)
class ViTConfig:
    """A timm VisionTransformer: built from these numbers, or `timm_name` with pretrained weights."""
    img_size: int = 28
    patch_size: int = 4
    in_chans: int = 1
    embed_dim: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 2.0
    timm_name: str | None = None  # full scale: timm.create_model(timm_name, pretrained=True)


VIT = {
    "tiny": ViTConfig(embed_dim=32, depth=1, num_heads=2, patch_size=7),
    "small": ViTConfig(embed_dim=96, depth=3, num_heads=3, patch_size=7),
    "full": ViTConfig(img_size=224, patch_size=32, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                      mlp_ratio=4.0, timm_name="vit_base_patch32_224.augreg_in21k_ft_in1k"),
}


@dataclass(frozen=True)
class Task:
    """A classification task: a source data set, a fixed image transform and which training
    examples it owns (index i is the task's when i % pools is in `pool`), so tasks and the
    pretraining mix built on one source see disjoint images."""
    name: str
    source: str            # embedded name (mnist, fashion_mnist, digits) or a torchvision class name
    transform: str = "none"  # none | rot90 | invert | upsample | upsample_invert
    n_classes: int = 10
    pool: tuple[int, ...] | None = None  # residues of the index mod `pools`; None: every example
    pools: int = 1
    labels: tuple[int, ...] | None = None  # task label of each source label (None: the same)


# The test accuracy every individual fine-tuned model should reach at small scale: below it, merges
# are compared on models too weak for the comparison to mean much (chapter 5 reports the lowest).
INDIVIDUAL_BAR = 0.88

# Fashion-MNIST's ten classes grouped into five kinds: tops (T-shirt, pullover, coat, shirt),
# trousers, dresses, footwear (sandal, sneaker, ankle boot) and bags. The ten-way task stays below
# INDIVIDUAL_BAR for every recipe that fits the small scale's budget (about 0.81 from our base).
FASHION_KINDS = (0, 1, 0, 2, 0, 3, 0, 3, 4, 3)


# MNIST training images (4000): residues mod 8 {0,1,2} pretraining, {3,4} mnist, {5,6,7} rotated;
# Fashion-MNIST: even / odd halves of the embedded 6000 (pretraining uses other images of the
# full Debian set, fashion_mnist_extra); digits: every 4th to pretraining, the rest to the task.
SMALL_TASKS = (
    Task("mnist", "mnist", pool=(3, 4), pools=8),
    Task("fashion", "fashion_mnist", n_classes=5, pool=(0,), pools=2, labels=FASHION_KINDS),
    Task("digits", "digits", "upsample", pool=(1, 2, 3), pools=4),
    Task("rot_mnist", "mnist", "rot90", pool=(5, 6, 7), pools=8),
    Task("inv_fashion", "fashion_mnist", "invert", n_classes=5, pool=(1,), pools=2, labels=FASHION_KINDS),
)
# (source, transform, pool, pools, repeats): disjoint from every task above; the scarce digit
# images are repeated 4 times so that they weigh about as much as the 8000 Fashion-MNIST ones
PRETRAIN_SOURCES = (
    ("fashion_mnist_extra", "none", None, 1, 1),
    ("mnist", "none", (0, 1, 2), 8, 4),
    ("digits", "upsample", (0,), 4, 4),
)
FULL_TASKS = tuple(Task(n, n, n_classes=c) for n, c in [
    ("MNIST", 10), ("SVHN", 10), ("GTSRB", 43), ("EuroSAT", 10), ("DTD", 47), ("SUN397", 397),
    ("StanfordCars", 196), ("FashionMNIST", 10)])  # the 8-task suite, RESISC45 (not in torchvision) swapped


def tasks_for(scale: str) -> tuple[Task, ...]:
    return FULL_TASKS if scale == "full" else SMALL_TASKS


def _upsample(x: Tensor) -> Tensor:
    return F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)


def _transform(kind: str) -> Callable[[Tensor], Tensor] | None:
    """Fixed tensor transforms of [N, 1, H, W] images in [0, 1]."""
    return {"none": None,
            "rot90": lambda x: torch.rot90(x, 1, (2, 3)),
            "invert": lambda x: 1.0 - x,
            "upsample": _upsample,
            "upsample_invert": lambda x: 1.0 - _upsample(x),
            }[kind]


def _owned(n: int, pool: tuple[int, ...] | None, pools: int) -> np.ndarray:
    """Indices i < n with i % pools in pool (all of them for pool None)."""
    i = np.arange(n)
    return i if pool is None else i[np.isin(i % pools, pool)]


def validation_part(n: int, fraction: float) -> np.ndarray:
    """Boolean mask of the validation examples among n: every round(1/fraction)-th (none for 0)."""
    if not 0 <= fraction < 1:
        raise MergeError(f"the validation fraction must be in [0, 1), got {fraction}")
    mask = np.zeros(n, dtype=bool)
    if fraction > 0:
        mask[::max(2, round(1 / fraction))] = True
    return mask


def task_splits(task: Task, scale: str, *, n_train: int | None = None, n_test: int | None = None,
                val_fraction: float = 0.2, root: str | None = None,
                seed: int = 0) -> tuple[Dataset, Dataset, Dataset]:
    """(train, validation, test) of a task. The validation examples are carved from the task's
    own training examples (every 1/val_fraction-th), so knobs are chosen without the test set;
    train is then capped at n_train, test at n_test. `full` reads torchvision data under `root`."""
    if scale == "full":
        if root is None:
            raise MergeError("full scale needs root=<folder with the torchvision data sets>")
        tf = D.vit_transform(VIT["full"].img_size)
        train, test = (D.load_torchvision(task.source, root, tr, tf) for tr in (True, False))
        is_val = validation_part(len(train), val_fraction)
        tr_idx, va_idx = np.flatnonzero(~is_val).tolist(), np.flatnonzero(is_val).tolist()
        return (D.cap(Subset(train, tr_idx), n_train, seed), Subset(train, va_idx),
                D.cap(test, n_test, seed))
    a = D.load_arrays(task.source, root)
    own = _owned(len(a["y_train"]), task.pool, task.pools)
    is_val = validation_part(len(own), val_fraction)
    tf = _transform(task.transform)
    x, y, y_test = a["x_train"], a["y_train"], a["y_test"]
    if task.labels is not None:
        y, y_test = np.asarray(task.labels)[y], np.asarray(task.labels)[y_test]
    train = D.to_tensor_dataset(x[own[~is_val]], y[own[~is_val]], tf)
    val = D.to_tensor_dataset(x[own[is_val]], y[own[is_val]], tf)
    test = D.to_tensor_dataset(a["x_test"], y_test, tf)
    return D.cap(train, n_train, seed), val, D.cap(test, n_test, seed)


def task_data(task: Task, scale: str, *, n_train: int | None = None, n_test: int | None = None,
              root: str | None = None, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(train, test) of a task: `task_splits` without a validation part (all owned examples train)."""
    train, _, test = task_splits(task, scale, n_train=n_train, n_test=n_test, val_fraction=0.0,
                                 root=root, seed=seed)
    return train, test


def pretrain_data(scale: str, n_per_source: int | None, root: str | None = None) -> TensorDataset:
    """The base model's mix (PRETRAIN_SOURCES): training images that no task owns, labels offset
    per source (fashion 0-9, mnist 10-19, digits 20-29). Training on it with `augment` (random
    quarter turns and inversions) lets theta_0 see the rotated and inverted domains too."""
    if scale == "full":
        raise MergeError("full scale starts from timm's pretrained weights; there is no pretraining mix")
    xs, ys = [], []
    for k, (src, kind, pool, pools, repeats) in enumerate(PRETRAIN_SOURCES):
        a = D.load_arrays(src, root)
        own = _owned(len(a["y_train"]), pool, pools)[:n_per_source]
        x, y = D.to_tensor_dataset(a["x_train"][own], a["y_train"][own], _transform(kind)).tensors
        xs += [x] * repeats
        ys += [y + 10 * k] * repeats
    return TensorDataset(torch.cat(xs), torch.cat(ys))


def augment(x: Tensor, p: float, generator: torch.Generator) -> Tensor:
    """A random quarter turn (90, 180 or 270 degrees) with probability p and, independently,
    inverted grey levels (1 - x) with probability p, per image of [N, C, H, W] in [0, 1]."""
    if p <= 0:
        return x
    out = x.clone()
    turn = torch.rand(len(x), generator=generator) < p
    k = torch.randint(1, 4, (len(x),), generator=generator)
    for q in (1, 2, 3):
        m = turn & (k == q)
        out[m] = torch.rot90(x[m], q, (2, 3))
    inv = torch.rand(len(x), generator=generator) < p
    out[inv] = 1.0 - out[inv]
    return out


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------

def make_backbone(cfg: ViTConfig, *, pretrained: bool = False, seed: int = 0) -> nn.Module:
    """A timm VisionTransformer without classifier (num_classes=0): images -> pooled features."""
    import timm
    if cfg.timm_name is not None:
        return timm.create_model(cfg.timm_name, pretrained=pretrained, num_classes=0)
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(seed)
    return VisionTransformer(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                             num_classes=0, embed_dim=cfg.embed_dim, depth=cfg.depth,
                             num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, global_pool="avg")


class TaskModel(nn.Module):
    """backbone + one task's head: the model of one task (state-dict keys backbone.*, head.*)."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


def make_head(cfg: ViTConfig, n_classes: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(cfg.embed_dim, n_classes)


def backbone_keys(sd: Mapping[str, Tensor], prefix: str = "backbone.") -> dict[str, Tensor]:
    """The backbone part of a TaskModel state dict (or Fisher), prefix stripped."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def task_model(cfg: ViTConfig, backbone_sd: Mapping[str, Tensor], head_sd: Mapping[str, Tensor],
               n_classes: int) -> TaskModel:
    """A fresh TaskModel holding copies of the given backbone and head weights."""
    bb = make_backbone(cfg)
    bb.load_state_dict(backbone_sd)
    head = make_head(cfg, n_classes)
    head.load_state_dict(head_sd)
    return TaskModel(bb, head).eval()


# ---------------------------------------------------------------------------------------------
# loops (device-aware; the multi-task loop draws tasks round-robin)
# ---------------------------------------------------------------------------------------------

def loader(ds: Dataset, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(seed) if shuffle else None)


def _cycle(dl: DataLoader) -> Iterator:
    while True:
        yield from dl


def cosine(step: int, steps: int, warmup: float = 0.05) -> float:
    """The learning-rate factor at `step`: linear warm-up over the first warmup * steps steps,
    then a cosine from 1 down to 0 (no one-cycle peak above the base rate)."""
    w = max(1, round(warmup * steps))
    return min(1.0, (step + 1) / w) * 0.5 * (1.0 + math.cos(math.pi * step / steps))


def fit(backbone: nn.Module, heads: Sequence[nn.Module], datasets: Sequence[Dataset], *, steps: int,
        batch_size: int, lr: float, head_lr: float | None = None, warmup: float = 0.05,
        weight_decay: float = 0.0, augment_p: float = 0.0, seed: int = 0,
        prior: Mapping[str, Tensor] | None = None, prior_precision: float = 0.0, device: str = "cpu",
        progress: bool = True, desc: str = "fit") -> None:
    """AdamW on backbone (learning rate lr) + heads (head_lr, default lr) for `steps` steps with
    a cosine schedule, cycling through the tasks' data round-robin (one task: plain fine-tuning).
    Per step the loss is the batch-mean cross-entropy plus (prior_precision / 2) ||backbone - prior||^2:
    the per-example form of the paper's objective lbar_t(theta) / N_t + (delta / 2N_t) ||theta - theta_0||^2
    when prior_precision = delta / N_t; the prior's gradient prior_precision (theta - prior) is added
    to the gradients directly (the same step as differentiating it, without ~50 extra autograd
    nodes per step). augment_p > 0 applies `augment` to every batch."""
    torch.manual_seed(seed)
    backbone.to(device).train()
    for h in heads:
        h.to(device).train()
    groups = [{"params": list(backbone.parameters()), "lr": lr},
              {"params": [p for h in heads for p in h.parameters()], "lr": lr if head_lr is None else head_lr}]
    opt = torch.optim.AdamW(groups, weight_decay=weight_decay)
    peak = [g["lr"] for g in opt.param_groups]
    its = [_cycle(loader(ds, batch_size, shuffle=True, seed=seed + i)) for i, ds in enumerate(datasets)]
    gen = torch.Generator().manual_seed(seed)
    named = dict(backbone.named_parameters())
    pulled = ([(named[k], v.to(device)) for k, v in prior.items()]
              if prior is not None and prior_precision > 0 else [])
    for step in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        for g, top in zip(opt.param_groups, peak):
            g["lr"] = top * cosine(step, steps, warmup)
        t = step % len(heads)
        x, y = next(its[t])
        x = augment(x, augment_p, gen)
        loss = F.cross_entropy(heads[t](backbone(x.to(device))), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            for p, p0 in pulled:  # d/dtheta (prior_precision / 2) ||theta - prior||^2
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.add_(p - p0, alpha=prior_precision)
        opt.step()
    backbone.eval()
    for h in heads:
        h.eval()


def eval_batches(ds: Dataset, batch_size: int = 500) -> Iterator[tuple[Tensor, Tensor]]:
    """(inputs, labels) of `ds` in order, `batch_size` at a time: slices of its tensors where it
    is held in memory (`data.as_tensors`), else a DataLoader (which indexes and collates image by
    image)."""
    held = D.as_tensors(ds)
    if held is None:
        yield from loader(ds, batch_size)
        return
    x, y = held
    for i in range(0, len(y), batch_size):
        yield x[i:i + batch_size], y[i:i + batch_size]


@torch.inference_mode()
def features(backbone: nn.Module, ds: Dataset, *, batch_size: int = 500,
             device: str = "cpu") -> tuple[Tensor, Tensor]:
    """(pooled backbone features, labels) of every example of `ds`, the backbone in eval mode."""
    backbone.to(device).eval()
    fs, ys = [], []
    for x, y in eval_batches(ds, batch_size):
        fs.append(backbone(x.to(device)))
        ys.append(y.to(device))
    return torch.cat(fs), torch.cat(ys)


def linear_probe(backbone: nn.Module, head: nn.Linear, ds: Dataset, *, steps: int = 300,
                 lr: float = 1e-2, weight_decay: float = 1e-4, device: str = "cpu") -> nn.Linear:
    """Fit `head` in place on the frozen backbone's features of `ds` (full-batch AdamW on the
    cross-entropy): the head that fine-tuning then starts from, so the backbone is not bent
    towards a random head."""
    fx, y = (v.clone() for v in features(backbone, ds, device=device))  # out of inference mode
    head.to(device).train()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        loss = F.cross_entropy(head(fx), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return head.eval()


@torch.inference_mode()
def accuracy(model: nn.Module, ds: Dataset, *, batch_size: int = 500, device: str = "cpu") -> float:
    """Fraction of `ds` that `model` classifies correctly."""
    model.to(device).eval()
    correct = total = 0
    for x, y in eval_batches(ds, batch_size):
        correct += (model(x.to(device)).argmax(-1).cpu() == y).sum().item()
        total += len(y)
    if total == 0:
        raise MergeError("accuracy: the data set is empty")
    return correct / total


@contextlib.contextmanager
def fast_cpu() -> Iterator[None]:
    """Run without oneDNN (mkldnn): on these CPUs it spends ~0.5 s re-planning every new batch
    shape of a small ViT, 10-20x the step itself. Restores the previous setting on exit."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
        with torch.backends.mkldnn.flags(enabled=False):
            yield


def config_dict(obj) -> dict:
    """A dataclass (or tuple of them) as plain data, for cache keys and reports."""
    if isinstance(obj, (tuple, list)):
        return [config_dict(o) for o in obj]
    return asdict(obj)


def subsets(n: int, min_size: int = 2, per_size: int | None = None, seed: int = 0) -> list[tuple[int, ...]]:
    """Subsets of range(n) with at least `min_size` members; at most `per_size` random ones per size."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(min_size, n + 1):
        combos = list(itertools.combinations(range(n), k))
        if per_size is not None and len(combos) > per_size:
            pick = torch.randperm(len(combos), generator=g)[:per_size].sort().values.tolist()
            combos = [combos[i] for i in pick]
        out += combos
    return out
