"""ViTs with one head per task: configs by scale, the task suite, and the training loops.

A task model is a shared timm VisionTransformer backbone (no classifier) plus its own linear
head. Only backbones are merged; each task keeps its head. Small scales train the backbone from
scratch on a mix of all source domains (the "pretrained" theta_0); `full` loads timm weights.
"""
from __future__ import annotations

import contextlib
import itertools
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
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
    """A classification task: a source data set, a fixed image transform and which half of the
    source's training set it uses (so tasks built on one source see disjoint images)."""
    name: str
    source: str            # embedded name (mnist, fashion_mnist, digits) or a torchvision class name
    transform: str = "none"  # none | rot90 | invert | upsample
    n_classes: int = 10
    half: int | None = None  # 0 / 1: even / odd training examples; None: all of them


SMALL_TASKS = (
    Task("mnist", "mnist", half=0),
    Task("fashion", "fashion_mnist", half=0),
    Task("digits", "digits", "upsample"),
    Task("rot_mnist", "mnist", "rot90", half=1),
    Task("inv_fashion", "fashion_mnist", "invert", half=1),
)
FULL_TASKS = tuple(Task(n, n, n_classes=c) for n, c in [
    ("MNIST", 10), ("SVHN", 10), ("GTSRB", 43), ("EuroSAT", 10), ("DTD", 47), ("SUN397", 397),
    ("StanfordCars", 196), ("FashionMNIST", 10)])  # the 8-task suite, RESISC45 (not in torchvision) swapped


def tasks_for(scale: str) -> tuple[Task, ...]:
    return FULL_TASKS if scale == "full" else SMALL_TASKS


def _transform(kind: str) -> Callable[[Tensor], Tensor] | None:
    """Fixed tensor transforms of [N, 1, H, W] images in [0, 1]."""
    return {"none": None,
            "rot90": lambda x: torch.rot90(x, 1, (2, 3)),
            "invert": lambda x: 1.0 - x,
            "upsample": lambda x: F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False),
            }[kind]


def task_data(task: Task, scale: str, *, n_train: int | None = None, n_test: int | None = None,
              root: str | None = None, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(train, test) data sets of a task, capped at n_train / n_test examples.

    Small scales read the embedded arrays (root: their folder); `full` reads torchvision data
    sets from `root` (required, download=False)."""
    if scale == "full":
        if root is None:
            raise MergeError("full scale needs root=<folder with the torchvision data sets>")
        tf = D.vit_transform(VIT["full"].img_size)
        train, test = (D.load_torchvision(task.source, root, tr, tf) for tr in (True, False))
    else:
        a = D.load_arrays(task.source, root)
        xtr, ytr = a["x_train"], a["y_train"]
        if task.half is not None:
            xtr, ytr = xtr[task.half::2], ytr[task.half::2]
        tf = _transform(task.transform)
        train, test = D.to_tensor_dataset(xtr, ytr, tf), D.to_tensor_dataset(a["x_test"], a["y_test"], tf)
    return D.cap(train, n_train, seed), D.cap(test, n_test, seed)


def pretrain_data(scale: str, n_per_source: int | None, root: str | None = None) -> TensorDataset:
    """The base model's mix: the untransformed training images of every source, labels offset per
    source (mnist 0-9, fashion 10-19, digits 20-29), so theta_0 has seen all domains but not the
    rotated or inverted tasks."""
    if scale == "full":
        raise MergeError("full scale starts from timm's pretrained weights; there is no pretraining mix")
    xs, ys = [], []
    for k, src in enumerate(("mnist", "fashion_mnist", "digits")):
        a = D.load_arrays(src, root)
        ds = D.to_tensor_dataset(a["x_train"], a["y_train"], _transform("upsample" if src == "digits" else "none"))
        x, y = ds.tensors
        if n_per_source is not None:
            x, y = x[:n_per_source], y[:n_per_source]
        xs.append(x)
        ys.append(y + 10 * k)
    return TensorDataset(torch.cat(xs), torch.cat(ys))


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


def fit(backbone: nn.Module, heads: Sequence[nn.Module], datasets: Sequence[Dataset], *, steps: int,
        batch_size: int, lr: float, seed: int = 0, prior: Mapping[str, Tensor] | None = None,
        prior_precision: float = 0.0, device: str = "cpu", progress: bool = True,
        desc: str = "fit") -> None:
    """AdamW on backbone + heads for `steps` steps, cycling through the tasks' data round-robin
    (one task: plain fine-tuning). Per step the loss is the batch-mean cross-entropy plus
    (prior_precision / 2) ||backbone - prior||^2: the per-example form of the paper's objective
    lbar_t(theta) / N_t + (delta / 2N_t) ||theta - theta_0||^2 when prior_precision = delta / N_t."""
    torch.manual_seed(seed)
    backbone.to(device).train()
    for h in heads:
        h.to(device).train()
    params = list(backbone.parameters()) + [p for h in heads for p in h.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    its = [_cycle(loader(ds, batch_size, shuffle=True, seed=seed + i)) for i, ds in enumerate(datasets)]
    named = dict(backbone.named_parameters())
    prior = {k: v.to(device) for k, v in prior.items()} if prior is not None else None
    for step in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        t = step % len(heads)
        x, y = next(its[t])
        loss = F.cross_entropy(heads[t](backbone(x.to(device))), y.to(device))
        if prior is not None and prior_precision > 0:
            loss = loss + 0.5 * prior_precision * sum(((named[k] - prior[k]) ** 2).sum() for k in prior)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    backbone.eval()
    for h in heads:
        h.eval()


@torch.no_grad()
def accuracy(model: nn.Module, ds: Dataset, *, batch_size: int = 500, device: str = "cpu") -> float:
    """Fraction of `ds` that `model` classifies correctly."""
    model.to(device).eval()
    correct = total = 0
    for x, y in loader(ds, batch_size):
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
