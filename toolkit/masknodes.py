"""Fisher Mask Nodes (Thennal D K, Nathan, Suchithra, 2024): one Fisher per attention head and per
FFN neuron instead of one per weight, then Fisher-weighted averaging of each node's parameters.

A mask m_j = 1 multiplies node j's output (head j's slice of the attention output before the output
projection; neuron j's activation before the second FFN layer), so the model is unchanged, and

    F_j = 1/N sum_n (d l_n / d m_j)^2,   d l_n / d m_j = sum_{tokens, features f of j} x_nf dl_n/dx_nf

(labels: the true ones, "empirical", as in the paper, or drawn from the model, "mc"). One backward
pass per batch gives every example's mask gradient: each example gets its own mask row.
Node j's parameters (its q/k/v rows and output-projection columns; its first-layer row and bias
and second-layer column) are then averaged with weights alpha_t F_tj (`masknode_average`);
parameters outside every node (embeddings, norms, output biases) are averaged with weights alpha_t.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .batch import logits as model_logits
from .errors import MergeError
from .gram import pre_hooks
from .merge import fisher_average, register

KINDS = ("empirical", "mc")


@dataclass(frozen=True)
class NodeGroup:
    """Nodes whose outputs are the input features of one linear layer, `size` features each."""
    name: str
    masked: str                                   # module name of that linear layer
    n_nodes: int
    size: int
    members: tuple[tuple[str, int, Tensor], ...]  # (parameter name, dim, node of each index along dim)


def _rows(n_nodes: int, size: int, repeat: int = 1) -> Tensor:
    """Node id of each row of a [repeat * n_nodes * size, ...] weight (e.g. q, k, v stacked)."""
    return torch.arange(n_nodes).repeat_interleave(size).repeat(repeat)


def node_groups(model: nn.Module) -> list[NodeGroup]:
    """Head and neuron groups of a timm VisionTransformer or a Hugging Face BERT-style encoder."""
    groups = []
    for name, mod in model.named_modules():
        p = f"{name}." if name else ""
        if hasattr(mod, "qkv") and hasattr(mod, "proj") and hasattr(mod, "num_heads"):  # timm Attention
            H, C = mod.num_heads, mod.proj.in_features
            d = C // H
            groups.append(NodeGroup(f"{p}heads", f"{p}proj", H, d, (
                (f"{p}qkv.weight", 0, _rows(H, d, 3)), (f"{p}qkv.bias", 0, _rows(H, d, 3)),
                (f"{p}proj.weight", 1, _rows(H, d)))))
        elif hasattr(mod, "fc1") and hasattr(mod, "fc2") and isinstance(mod.fc1, nn.Linear):  # timm Mlp
            n = mod.fc1.out_features
            groups.append(NodeGroup(f"{p}neurons", f"{p}fc2", n, 1, (
                (f"{p}fc1.weight", 0, _rows(n, 1)), (f"{p}fc1.bias", 0, _rows(n, 1)),
                (f"{p}fc2.weight", 1, _rows(n, 1)))))
        elif all(hasattr(mod, a) for a in ("attention", "intermediate", "output")) and \
                hasattr(mod.attention, "self"):  # transformers BertLayer (MiniLM, BERT, RoBERTa)
            att = mod.attention.self
            H, d = att.num_attention_heads, att.attention_head_size
            qkv = [(f"{p}attention.self.{w}.{k}", 0, _rows(H, d)) for w in ("query", "key", "value")
                   for k in ("weight", "bias")]
            groups.append(NodeGroup(f"{p}heads", f"{p}attention.output.dense", H, d,
                                    tuple(qkv) + ((f"{p}attention.output.dense.weight", 1, _rows(H, d)),)))
            n = mod.intermediate.dense.out_features
            groups.append(NodeGroup(f"{p}neurons", f"{p}output.dense", n, 1, (
                (f"{p}intermediate.dense.weight", 0, _rows(n, 1)), (f"{p}intermediate.dense.bias", 0, _rows(n, 1)),
                (f"{p}output.dense.weight", 1, _rows(n, 1)))))
    if not groups:
        raise MergeError("mask nodes: found no attention heads or FFN neurons (timm ViT or BERT-style encoders)")
    return groups


def node_fishers(model: nn.Module, batches: Iterable[tuple[Any, Tensor]], kind: str = "empirical", *,
                 groups: list[NodeGroup] | None = None, seed: int = 0,
                 max_examples: int | None = None) -> tuple[dict[str, Tensor], int]:
    """Mean Fisher of every mask node, {group name: [n_nodes]}, and the number of examples.
    Classification (logits [B, C]); one forward and one backward pass per batch; model unchanged."""
    if kind not in KINDS:
        raise MergeError(f"mask nodes: kind must be one of {KINDS}, got {kind!r}")
    groups = groups or node_groups(model)
    mods = dict(model.named_modules())
    acc = {g.name: torch.zeros(g.n_nodes, dtype=torch.float64) for g in groups}
    masks: dict[str, Tensor] = {}

    def hook(g: NodeGroup):
        def fn(mod, inp):
            x = inp[0]
            m = masks[g.name].repeat_interleave(g.size, dim=1).to(x.dtype)  # [B, features]
            return (x * m.view(m.shape[0], *([1] * (x.dim() - 2)), m.shape[1]),)
        return fn

    gen = torch.Generator().manual_seed(seed)
    seen = 0
    with pre_hooks(model, [(mods[g.masked], hook(g)) for g in groups]):
        with torch.enable_grad():
            for x, y in batches:
                B = len(y)
                if max_examples is not None:
                    if seen >= max_examples:
                        break
                    B = min(B, max_examples - seen)
                    x = {k: v[:B] for k, v in x.items()} if isinstance(x, dict) else x[:B]
                    y = y[:B]
                for g in groups:
                    masks[g.name] = torch.ones(B, g.n_nodes, requires_grad=True)
                z = model_logits(model, x)
                if kind == "mc":
                    with torch.no_grad():
                        y = torch.multinomial(F.softmax(z.detach().double().cpu(), -1), 1, generator=gen)[:, 0]
                    y = y.to(z.device)
                loss = F.cross_entropy(z, y, reduction="sum")  # per-example losses, one mask row each
                grads = torch.autograd.grad(loss, [masks[g.name] for g in groups])
                for g, gr in zip(groups, grads):
                    acc[g.name] += (gr.double() ** 2).sum(0).cpu()
                seen += B
    if seen == 0:
        raise MergeError("mask nodes: no examples in the batches")
    return {k: (v / seen).float() for k, v in acc.items()}, seen


def expand(fishers: Mapping[str, Tensor], groups: list[NodeGroup],
           shapes: Mapping[str, torch.Size]) -> dict[str, Tensor]:
    """Per-parameter weights from node Fishers: each element of node j's parameters gets F_j."""
    out = {}
    for g in groups:
        f = fishers[g.name]
        if f.shape != (g.n_nodes,):
            raise MergeError(f"mask nodes: {g.name} has {g.n_nodes} nodes, its Fisher shape {tuple(f.shape)}")
        for pname, dim, node in g.members:
            shape = shapes[pname]
            view = [1] * len(shape)
            view[dim] = shape[dim]
            out[pname] = f[node].view(view).expand(shape).clone()
    return out


@register("masknode_average", stats=("node_fishers",), elementwise=True, alpha_cancels=True,
          label="mask-node Fisher averaging", color="#56b4e9")
def masknode_average(base: Tensor, thetas: list[Tensor], alphas: list[float], node_fishers: list[Tensor | None],
                     fisher_floor: float = 0.0) -> Tensor:
    """Mask-node Fisher averaging: sum_t alpha_t F_tj theta_t / sum_t alpha_t F_tj per node j; no node: average."""
    have = [f is not None for f in node_fishers]
    if not any(have):
        return fisher_average(base, thetas, alphas, [torch.ones_like(base)] * len(thetas), [1.0] * len(thetas))
    if not all(have):
        raise MergeError(f"masknode_average: node Fishers given for {sum(have)} of {len(have)} models of "
                         "this tensor; give them for every model or for none")
    if any(f.shape != base.shape for f in node_fishers):
        raise MergeError(f"masknode_average: node Fishers must be expanded to the parameter's shape "
                         f"{tuple(base.shape)} (toolkit.masknodes.expand)")
    return fisher_average(base, thetas, alphas, node_fishers, [1.0] * len(thetas), fisher_floor)
