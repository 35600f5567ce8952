"""Diagonal Fisher estimators: brute force, backend agreement, MC statistics, BackPACK, causal LMs."""
import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from toolkit import MergeError
from toolkit.curvature import fisher

torch.set_num_threads(1)
D64 = torch.float64


# ---------------------------------------------------------------------------------------------
# Small float64 models and data
# ---------------------------------------------------------------------------------------------


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.ReLU(inplace=True), nn.Linear(7, 3)).to(D64)


class TextNet(nn.Module):
    """Embedding (with padding_idx) -> Conv1d over tokens -> mean -> Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6, padding_idx=0)
        self.conv = nn.Conv1d(6, 5, 3, padding=1)
        self.fc = nn.Linear(5, 3)

    def forward(self, ids):
        return self.fc(torch.relu(self.conv(self.emb(ids).transpose(1, 2))).mean(-1))


def text():
    torch.manual_seed(1)
    return TextNet().to(D64)


def conv():
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.Tanh(),
                         nn.Conv2d(4, 3, 2, stride=2, padding=1, padding_mode="reflect"),
                         nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).to(D64)


def vit():
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(3)
    return VisionTransformer(img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=1, num_heads=2,
                             num_classes=3).to(D64)


class Twice(nn.Module):
    """One Linear called twice per forward: per-example gradients must be summed before squaring."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(torch.tanh(self.fc(x)))))


def twice():
    torch.manual_seed(4)
    return Twice().to(D64)


class OnePlusRMSNorm(nn.Module):
    """Gemma-style RMSNorm, y = (1 + w) x / rms(x): looks like an RMSNorm but is not w x / rms(x)."""

    def __init__(self, d):
        super().__init__()
        self.weight, self.eps = nn.Parameter(0.1 * torch.randn(d)), 1e-6

    def forward(self, x):
        return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def norms():
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(5, 6), nn.RMSNorm(6), nn.Tanh(), OnePlusRMSNorm(6),
                         nn.Linear(6, 3)).to(D64)


def data(name, n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = {"mlp": lambda: torch.randn(n, 5, generator=g, dtype=D64),
         "twice": lambda: torch.randn(n, 5, generator=g, dtype=D64),
         "norms": lambda: torch.randn(n, 5, generator=g, dtype=D64),
         "text": lambda: torch.randint(0, 20, (n, 6), generator=g),
         "conv": lambda: torch.randn(n, 2, 6, 6, generator=g, dtype=D64),
         "vit": lambda: torch.randn(n, 1, 8, 8, generator=g, dtype=D64)}[name]()
    return x, torch.randint(0, 3, (n,), generator=g)


MODELS = {"mlp": mlp, "text": text, "conv": conv, "vit": vit, "twice": twice, "norms": norms}


def batches(x, y, size):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]


def per_class_grads(model, x, n_classes=3):
    """Brute force, one example and one class at a time: p [N, C] and g[n][c] = {name: grad log p}."""
    model.eval()
    names, params = zip(*model.named_parameters())
    probs, grads = [], []
    for n in range(len(x)):
        logp = torch.log_softmax(model(x[n:n + 1])[0], -1)
        probs.append(logp.exp().detach())
        grads.append([dict(zip(names, torch.autograd.grad(logp[c], params, retain_graph=True)))
                      for c in range(n_classes)])
    return torch.stack(probs), grads


def brute_force(model, x, y):
    """Exact Fisher 1/N sum_n sum_c p_nc g_nc^2 and empirical Fisher 1/N sum_n g_{n,y_n}^2."""
    p, g = per_class_grads(model, x)
    N = len(x)
    exact = {k: sum(p[n, c] * g[n][c][k] ** 2 for n in range(N) for c in range(3)) / N for k in g[0][0]}
    emp = {k: sum(g[n][int(y[n])][k] ** 2 for n in range(N)) / N for k in g[0][0]}
    return exact, emp


def assert_close(a, b, rtol):
    assert sorted(a) == sorted(b)
    for k in b:
        scale = float(b[k].abs().max()) + 1e-300
        err = float((a[k] - b[k]).abs().max()) / scale
        assert err < rtol, f"{k}: relative error {err:.2e}"


# ---------------------------------------------------------------------------------------------
# Correctness against brute force and between backends
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_exact_and_empirical_match_brute_force(name):
    model = MODELS[name]()
    x, y = data(name)
    exact, emp = brute_force(model, x, y)
    for backend in ("hooks", "loop"):
        assert_close(fisher(model, batches(x, y, 4), "exact", backend=backend, progress=False), exact, 1e-10)
        got = fisher(model, batches(x, y, 4), "empirical", backend=backend, progress=False)
        assert_close(got, emp, 1e-10)


@pytest.mark.parametrize("name", list(MODELS))
def test_hooks_equal_loop_for_mc_and_batch_squared(name):
    model = MODELS[name]()
    x, y = data(name, seed=1)
    b = batches(x, y, 4)
    mc = [fisher(model, b, "mc", n_samples=3, seed=7, backend=be, progress=False) for be in ("hooks", "loop")]
    assert_close(mc[0], mc[1], 1e-10)
    bs = [fisher(model, b, "batch_squared", backend=be, progress=False) for be in ("hooks", "loop")]
    assert_close(bs[0], bs[1], 1e-10)


def test_vit_uses_the_batch_expanded_copy_for_cls_token_and_pos_embed():
    """The z trick (p + z, z [B, ...]) is verified against the loop and kept for timm's ViT."""
    from toolkit.curvature import select_params
    from toolkit.persample import HookEngine
    model = vit()
    chosen, _ = select_params(model, None)
    acc = {k: torch.zeros_like(p) for k, p in chosen.items()}
    with HookEngine(model.eval(), chosen, acc) as eng:
        z = eng.forward(data("vit", 3)[0])
        eng.backward(z, torch.randn_like(z))
    assert sorted(eng.zparams) == ["cls_token", "pos_embed"] and eng.loop == []


class Shifted(nn.Module):
    """A [1, D] parameter the z trick must NOT be used for: indexed by its first dim, or reshaped."""

    def __init__(self, use):
        super().__init__()
        self.use, self.fc, self.shift = use, nn.Linear(5, 3), nn.Parameter(torch.randn(1, 5))

    def forward(self, x):
        s = self.shift[0] if self.use == "index" else self.shift.reshape(-1)
        return self.fc(torch.tanh(x + s))


@pytest.mark.parametrize("use", ["index", "reshape"])
def test_z_trick_falls_back_to_the_loop_where_it_would_be_wrong(use):
    from toolkit.curvature import select_params
    from toolkit.persample import HookEngine
    torch.manual_seed(0)
    model = Shifted(use).to(D64)
    x, y = data("mlp", 6)
    assert_close(fisher(model, [(x, y)], "exact", progress=False), brute_force(model, x, y)[0], 1e-10)
    chosen, _ = select_params(model, None)
    with HookEngine(model.eval(), chosen, {k: torch.zeros_like(p) for k, p in chosen.items()}) as eng:
        z = eng.forward(x)
        eng.backward(z, torch.randn_like(z))
    assert eng.zparams == [] and eng.loop == ["shift"]


def test_rmsnorm_hooked_and_a_look_alike_that_differs_is_looped():
    from toolkit.curvature import select_params
    from toolkit.persample import HookEngine
    model = norms()
    chosen, _ = select_params(model, None)
    with HookEngine(model.eval(), chosen, {k: torch.zeros_like(p) for k, p in chosen.items()}) as eng:
        eng.forward(data("norms", 3)[0])
    assert eng.loop == ["3.weight"] and "1.weight" in eng.hookable


def test_mc_converges_to_exact_within_its_own_standard_error():
    """Many MC draws: |F_mc - F| must be within 5 standard errors, computed exactly from the label
    distribution (Var over y ~ p of g_y^2); a 10% scaling error, the batch-mean scaling and the
    empirical Fisher all lie far outside that bound, so a wrong estimator cannot pass."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(D64)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(4, 3, generator=g, dtype=D64), torch.randint(0, 3, (4,), generator=g)
    N, S = len(x), 3000
    p, gr = per_class_grads(model, x)
    vec = lambda d: torch.cat([v.flatten() for v in d.values()])  # noqa: E731
    g2 = torch.stack([torch.stack([vec(gr[n][c]) ** 2 for c in range(3)]) for n in range(N)])  # [N, C, P]
    exact = (p[..., None] * g2).sum(1).mean(0)
    var_entry = ((p[..., None] * g2 ** 2).sum(1) - (p[..., None] * g2).sum(1) ** 2).sum(0) / (N ** 2 * S)
    h = g2.sum(-1)  # ||g_nc||^2
    sd_trace = math.sqrt(float(((p * h ** 2).sum(1) - (p * h).sum(1) ** 2).sum()) / (N ** 2 * S))

    mc = vec(fisher(model, [(x, y)], "mc", n_samples=S, seed=0, progress=False))
    emp = vec(fisher(model, [(x, y)], "empirical", progress=False))
    z_trace = lambda f: float(f.sum() - exact.sum()) / sd_trace  # noqa: E731
    assert abs(z_trace(mc)) < 5
    ok = var_entry > 0
    assert float(((mc - exact)[ok] / var_entry[ok].sqrt()).abs().max()) < 6
    assert torch.equal(mc[~ok], exact[~ok])
    for wrong in (1.1 * mc, mc / N, emp):
        assert abs(z_trace(wrong)) > 5


def test_batch_squared_is_the_square_of_the_mean_loss_gradient_and_about_batch_size_too_small():
    torch.manual_seed(6)
    model = nn.Linear(20, 4).to(D64)
    B, K = 16, 40
    g = torch.Generator().manual_seed(6)
    x = torch.randn(B * K, 20, generator=g, dtype=D64)  # zero mean, labels independent of x:
    y = torch.arange(B * K) % 4  # per-example weight gradients (p - e_y) x^T are uncorrelated
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    data_ = batches(x, y, B)
    bs = fisher(model, data_, "batch_squared", progress=False)
    ref = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
    for xb, yb in data_:
        for (k, _), gk in zip(model.named_parameters(), torch.autograd.grad(F.cross_entropy(model(xb), yb),
                                                                         list(model.parameters()))):
            ref[k] += gk ** 2 / K
    assert_close(bs, ref, 1e-12)
    emp = fisher(model, data_, "empirical", progress=False)
    for k in emp:  # Jensen, per batch and entry: (mean g)^2 <= mean g^2
        assert (bs[k] <= emp[k] + 1e-15).all()
    ratio = float(emp["weight"].sum() / bs["weight"].sum())  # E||mean g||^2 = E||g||^2 / B here
    assert B / 2 < ratio < 2 * B, ratio


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_backpack_agrees():
    """BackPACK with CrossEntropyLoss(reduction='sum'): DiagGGNExact = N * exact Fisher (the GGN of
    softmax cross-entropy is its Fisher), SumGradSquared = N * empirical, BatchGrad = per-example
    gradients. (With reduction='mean' they would carry 1/N, 1/N^2 and 1/N.)"""
    backpack = pytest.importorskip("backpack")
    from backpack.extensions import BatchGrad, DiagGGNExact, SumGradSquared
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).to(D64)
    x, y = torch.randn(12, 5, dtype=D64), torch.randint(0, 3, (12,))
    exact = fisher(model, batches(x, y, 6), "exact", progress=False)
    emp = fisher(model, batches(x, y, 6), "empirical", progress=False)
    bp = backpack.extend(copy.deepcopy(model))
    loss = backpack.extend(nn.CrossEntropyLoss(reduction="sum"))(bp(x), y)
    with backpack.backpack(DiagGGNExact(), SumGradSquared(), BatchGrad()):
        loss.backward()
    N = len(y)
    for k, p in bp.named_parameters():
        assert torch.allclose(exact[k], p.diag_ggn_exact / N, rtol=1e-5, atol=0)
        assert torch.allclose(emp[k], p.sum_grad_squared / N, rtol=1e-5, atol=0)
        assert torch.allclose(emp[k], (p.grad_batch ** 2).mean(0), rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------------
# Causal LM (tiny random Llama with tied embeddings)
# ---------------------------------------------------------------------------------------------


def llama(dtype=D64):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, vocab_size=32,
                                   max_position_embeddings=32, tie_word_embeddings=True)
    torch.manual_seed(8)
    return transformers.LlamaForCausalLM(cfg).to(dtype)


def lm_batch():
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(1, 32, (4, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding
    mask[2, :2] = 0  # left padding
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask}


def test_causal_lm_hooks_equal_loop_and_brute_force():
    model = llama()
    inp = lm_batch()
    data_ = [(inp, None)]
    emp = {be: fisher(model, data_, "empirical", task="causal_lm", backend=be, progress=False)
           for be in ("hooks", "loop")}
    assert_close(emp["hooks"], emp["loop"], 1e-10)
    mc = [fisher(model, data_, "mc", n_samples=2, seed=3, task="causal_lm", backend=be, progress=False)
          for be in ("hooks", "loop")]
    assert_close(mc[0], mc[1], 1e-10)
    # brute force: per sequence, summed next-token loss over positions whose input and target are real
    names, params = zip(*model.named_parameters())
    ref = {k: torch.zeros_like(p) for k, p in zip(names, params)}
    ids, mask = inp["input_ids"], inp["attention_mask"]
    for n in range(len(ids)):
        z = model(input_ids=ids[n:n + 1], attention_mask=mask[n:n + 1]).logits[0, :-1]
        keep = (mask[n, :-1] * mask[n, 1:]).bool()
        loss = F.cross_entropy(z[keep], ids[n, 1:][keep], reduction="sum")
        for k, gk in zip(names, torch.autograd.grad(loss, params)):
            ref[k] += gk ** 2 / len(ids)
    ref["lm_head.weight"] = ref["model.embed_tokens.weight"]
    assert_close(emp["hooks"], ref, 1e-10)
    # tied aliases: every state_dict name, equal values, distinct tensors
    assert sorted(emp["hooks"]) == sorted(model.state_dict())
    assert torch.equal(emp["hooks"]["lm_head.weight"], emp["hooks"]["model.embed_tokens.weight"])
    # right padding: tokens behind the mask cannot change anything
    inp2 = {k: v.clone() for k, v in inp.items()}
    inp2["input_ids"][1, 5:] = 7
    moved = fisher(model, [(inp2, None)], "empirical", task="causal_lm", progress=False)
    assert_close(moved, emp["hooks"], 1e-10)


def test_causal_lm_float32_hooks_cover_rmsnorm():
    """In float32 transformers' LlamaRMSNorm passes the look-alike check and goes through hooks."""
    from toolkit.curvature import select_params
    from toolkit.persample import HookEngine
    model = llama(torch.float32)
    inp = lm_batch()
    f = [fisher(model, [(inp, None)], "empirical", task="causal_lm", backend=be, progress=False)
         for be in ("hooks", "loop")]
    assert_close(f[0], f[1], 1e-4)
    assert all(v.dtype == torch.float32 for v in f[0].values())
    chosen, _ = select_params(model, None)
    with HookEngine(model.eval(), chosen, {k: torch.zeros_like(p) for k, p in chosen.items()}) as eng:
        eng.forward(inp)
    assert eng.loop == [] and eng.zparams == []


# ---------------------------------------------------------------------------------------------
# Options, side effects, errors
# ---------------------------------------------------------------------------------------------


def test_params_filter_and_tied_aliases():
    model = llama()
    data_ = [(lm_batch(), None)]
    full = fisher(model, data_, "empirical", task="causal_lm", progress=False)
    only = fisher(model, data_, "empirical", task="causal_lm", progress=False, params=["lm_head.weight"])
    assert sorted(only) == ["lm_head.weight", "model.embed_tokens.weight"]
    assert torch.equal(only["lm_head.weight"], full["lm_head.weight"])
    mlp_ = mlp()
    x, y = data("mlp")
    some = fisher(mlp_, [(x, y)], "exact", progress=False, params=lambda k: k.endswith("bias"))
    assert sorted(some) == ["0.bias", "1.bias", "3.bias"]
    assert_close(some, {k: v for k, v in brute_force(mlp_, x, y)[0].items() if k.endswith("bias")}, 1e-10)
    with pytest.raises(MergeError, match="not trainable parameters"):
        fisher(mlp_, [(x, y)], params=["0.weight", "nope"], progress=False)
    with pytest.raises(MergeError, match="no trainable parameters selected"):
        fisher(mlp_, [(x, y)], params=lambda k: False, progress=False)


def test_model_untouched_and_modes_restored():
    model = vit()
    model.train()
    model.head.eval()
    model.head.weight.grad = torch.ones_like(model.head.weight)
    before = copy.deepcopy(model.state_dict())
    x, y = data("vit", 4)
    x0 = x.clone()
    out = fisher(model, [(x, y)], "mc", progress=False)
    assert model.training and not model.head.training and model.blocks[0].training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert torch.equal(model.head.weight.grad, torch.ones_like(model.head.weight))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "head.weight")
    assert torch.equal(x, x0)
    assert not any(m._forward_hooks for m in model.modules())
    assert all(v.dtype == D64 and v.shape == before[k].shape for k, v in out.items())


def test_low_precision_model_gives_float32():
    model = mlp().to(torch.bfloat16)
    x, y = data("mlp")
    f = [fisher(model, [(x.to(torch.bfloat16), y)], "empirical", backend=be, progress=False)
         for be in ("hooks", "loop")]
    assert all(v.dtype == torch.float32 for v in f[0].values())
    assert_close(f[0], f[1], 0.05)


def test_seed_and_max_examples():
    model = mlp()
    x, y = data("mlp", 12)
    a = fisher(model, batches(x, y, 5), "mc", seed=1, progress=False)
    b = fisher(model, batches(x, y, 5), "mc", seed=1, progress=False)
    c = fisher(model, batches(x, y, 5), "mc", seed=2, progress=False)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    head = fisher(model, batches(x, y, 5), "empirical", max_examples=7, progress=False)
    assert_close(head, fisher(model, [(x[:7], y[:7])], "empirical", progress=False), 1e-12)


def test_errors_are_clear():
    model = mlp()
    x, y = data("mlp", 4)
    ok = [(x, y)]
    cases = [
        (dict(kind="fast"), "unknown kind"),
        (dict(backend="magic"), "unknown backend"),
        (dict(task="regression"), "unknown task"),
        (dict(kind="exact", task="causal_lm"), "only for task='classification'"),
        (dict(n_samples=0), "n_samples"),
        (dict(max_examples=0), "max_examples"),
    ]
    for kw, msg in cases:
        with pytest.raises(MergeError, match=msg):
            fisher(model, ok, progress=False, **kw)
    with pytest.raises(MergeError, match="no examples"):
        fisher(model, [], progress=False)
    with pytest.raises(MergeError, match="targets must be a tensor of shape"):
        fisher(model, [(x, y[:3])], progress=False)
    with pytest.raises(MergeError, match="must lie in"):
        fisher(model, [(x, y + 5)], progress=False)
    with pytest.raises(MergeError, match="pair"):
        fisher(model, [x], progress=False)
    with pytest.raises(MergeError, match="needs logits"):
        fisher(llama(), [(lm_batch(), None)], "empirical", progress=False)
    with pytest.raises(MergeError, match="input_ids"):
        fisher(model, ok, "empirical", task="causal_lm", progress=False)


# ---------------------------------------------------------------------------------------------
# Layouts the hooks must not get wrong: sequence-first, flattened tokens, a tied `emb.weight.T` head
# ---------------------------------------------------------------------------------------------


class SeqFirst(nn.Module):
    """nn.TransformerEncoderLayer with its default batch_first=False: examples on dimension 1."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(3, 8)
        self.enc = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # x [B, L, 3]
        return self.head(self.enc(self.emb(x.transpose(0, 1))).mean(0))


class Flat(nn.Module):
    """Tokens flattened into the batch: Embedding of ids [B*L], Linear of [B*L, D] (example-major),
    and a Linear of token-major [L*B, D] rows."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc, self.fc_t, self.head = nn.Embedding(11, 6), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, ids):  # ids [B, L]
        B, L = ids.shape
        h = torch.tanh(self.fc(self.emb(ids.reshape(-1)))).reshape(B, L, 6)
        h = torch.tanh(self.fc_t(h.transpose(0, 1).reshape(L * B, 6))).reshape(L, B, 6)
        return self.head(h.mean(0))


class TiedHead(nn.Module):
    """A tiny causal LM whose output layer is the embedding used as a matrix: h @ emb.weight.T."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(13, 6), nn.Linear(6, 6)

    def forward(self, input_ids, attention_mask=None):
        h = torch.tanh(self.fc(self.emb(input_ids))).cumsum(1)
        return h @ self.emb.weight.T


def seq_data(n=5, L=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, L, 3, generator=g, dtype=D64), torch.randint(0, 3, (n,), generator=g)


def hooks_vs_loop(model, b, kind, match=None, **kw):
    """The hooks backend warns (naming `match`) or not, and agrees with the loop to 1e-6."""
    import warnings
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = fisher(model, b, kind, backend="hooks", progress=False, seed=2, **kw)
    ref = fisher(model, b, kind, backend="loop", progress=False, seed=2, **kw)
    assert_close(got, ref, 1e-6)
    msgs = [str(x.message) for x in w if "hooks backend" in str(x.message)]
    if match is None:
        assert msgs == []
    else:
        assert len(msgs) == 1 and match in msgs[0], msgs
    return got


@pytest.mark.parametrize("L", [4, 6])  # L = 4: as many positions as examples, the shape cannot tell
@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_sequence_first_transformer_layer(kind, L):
    torch.manual_seed(10)
    model = SeqFirst().to(D64)
    x, y = seq_data(4, L)
    hooks_vs_loop(model, batches(x, y, 4), kind)


@pytest.mark.parametrize("kind", ["exact", "mc"])
def test_tokens_flattened_into_the_batch(kind):
    torch.manual_seed(11)
    model = Flat().to(D64)
    g = torch.Generator().manual_seed(1)
    ids, y = torch.randint(0, 11, (6, 5), generator=g), torch.randint(0, 3, (6,), generator=g)
    hooks_vs_loop(model, batches(ids, y, 3), kind)


def test_tied_head_used_outside_its_module_falls_back_for_that_parameter():
    torch.manual_seed(12)
    model = TiedHead().to(D64)
    ids = torch.randint(0, 13, (4, 5), generator=torch.Generator().manual_seed(2))
    for kind in ("empirical", "mc"):
        _PROBED_clear(model)
        hooks_vs_loop(model, [({"input_ids": ids}, None)], kind, match="'emb.weight'", task="causal_lm")


def _PROBED_clear(model):
    from toolkit.persample import _PROBED
    _PROBED.pop(model, None)


def test_a_layer_that_mixes_examples_falls_back():
    """BatchNorm in training mode (called directly on the engine): examples interact upstream."""
    from toolkit.curvature import select_params
    from toolkit.persample import HookEngine
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).to(D64).train()
    chosen, _ = select_params(model, None)
    with pytest.warns(UserWarning, match="layer '0' .* mixes examples"), HookEngine(model, chosen, {k: torch.zeros_like(p) for k, p in chosen.items()}) as eng:
        z = eng.forward(torch.randn(6, 4, dtype=D64))
        eng.backward(z, torch.randn_like(z))
    assert {"0.weight", "0.bias"} <= set(eng.loop) and "1.weight" not in eng.loop


# ---------------------------------------------------------------------------------------------
# Fast rules: BatchNorm, GroupNorm; unused parameters; the exact Fisher in one batched pass
# ---------------------------------------------------------------------------------------------


class Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.spare, self.free = nn.Linear(5, 3), nn.Linear(5, 3), nn.Parameter(torch.ones(2, 2))

    def forward(self, x):
        return self.fc(x)


def bn_cnn():
    torch.manual_seed(14)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3),
                         nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 6), nn.BatchNorm1d(6),
                         nn.Linear(6, 3)).to(D64)


@pytest.mark.parametrize("kind", ["exact", "mc", "empirical"])
def test_batchnorm_and_groupnorm_have_fast_rules(kind):
    from toolkit.curvature import select_params
    from toolkit.persample import HookEngine
    model = bn_cnn()
    with torch.no_grad():  # running statistics away from 0 / 1, so that eval mode matters
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    model.train()
    x, y = data("conv", 8)
    hooks_vs_loop(model, batches(x, y, 4), kind)
    assert model.training and model[1].num_batches_tracked == 0  # mode restored, statistics untouched
    chosen, _ = select_params(model, None)
    with HookEngine(model.eval(), chosen, {k: torch.zeros_like(p) for k, p in chosen.items()}) as eng:
        z = eng.forward(x)
        eng.backward(z, torch.randn_like(z))
    assert eng.loop == []


def test_parameters_without_gradient_are_skipped():
    from toolkit.curvature import select_params
    from toolkit.persample import HookEngine
    torch.manual_seed(15)
    model = Unused().to(D64)
    x, y = data("mlp", 6)
    f = hooks_vs_loop(model, [(x, y)], "exact")
    assert all(float(f[k].abs().max()) == 0 for k in ("spare.weight", "spare.bias", "free"))
    chosen, _ = select_params(model, None)
    with HookEngine(model.eval(), chosen, {k: torch.zeros_like(p) for k, p in chosen.items()}) as eng:
        z = eng.forward(x)
        assert eng.unused == {"spare.weight", "spare.bias", "free"} and eng._looped() == []


def test_exact_fisher_uses_one_batched_backward_pass(monkeypatch):
    """The C square-root factors go through the hooks as one batch of output gradients."""
    from toolkit import persample
    calls = []
    real = torch.autograd.grad

    def spy(*a, **kw):
        calls.append(kw.get("is_grads_batched", False))
        return real(*a, **kw)

    model = vit()
    x, y = data("vit", 6)
    fisher(model, [(x, y)], "exact", progress=False)  # the check runs on the first call
    monkeypatch.setattr(persample.torch.autograd, "grad", spy)
    fisher(model, [(x, y)], "exact", progress=False)
    assert calls == [True]
    assert not persample._BATCHED_FAILS.get(model, False)


# ---------------------------------------------------------------------------------------------
# Backends by name
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["exact", "mc", "empirical"])
def test_backends_agree(kind):
    from toolkit.backends import BACKENDS
    assert {"hooks", "loop", "vmap", "backpack"} <= set(BACKENDS)
    torch.manual_seed(16)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).to(D64)
    x, y = data("mlp", 8)
    ref = fisher(model, batches(x, y, 4), kind, backend="loop", seed=3, progress=False)
    names = ["hooks", "vmap"] + (["backpack"] if _has_backpack() else [])
    for be in names:
        assert_close(fisher(model, batches(x, y, 4), kind, backend=be, seed=3, progress=False), ref, 1e-8)


def _has_backpack():
    try:
        import backpack  # noqa: F401
    except ImportError:
        return False
    return True


def test_backpack_missing_is_a_clear_error(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "backpack", None)
    model = mlp()
    with pytest.raises(MergeError, match="backpack-for-pytorch"):
        fisher(model, [data("mlp", 4)], backend="backpack", progress=False)


# ---------------------------------------------------------------------------------------------
# Causal LM: per-token Fisher, examples without a counted token, NaN inputs
# ---------------------------------------------------------------------------------------------


def test_per_token_fisher_equals_brute_force():
    model = llama()
    inp = lm_batch()
    data_ = [(inp, None)]
    got = fisher(model, data_, "empirical", task="causal_lm", per="token", progress=False)
    names, params = zip(*model.named_parameters())
    ref = {k: torch.zeros_like(p) for k, p in zip(names, params)}
    ids, mask = inp["input_ids"], inp["attention_mask"]
    T = 0
    for n in range(len(ids)):
        z = model(input_ids=ids[n:n + 1], attention_mask=mask[n:n + 1]).logits[0]
        for t in range(ids.shape[1] - 1):
            if mask[n, t] and mask[n, t + 1]:
                T += 1
                loss = F.cross_entropy(z[t], ids[n, t + 1])
                for k, gk in zip(names, torch.autograd.grad(loss, params, retain_graph=True)):
                    ref[k] += gk ** 2
    ref = {k: v / T for k, v in ref.items()}
    ref["lm_head.weight"] = ref["model.embed_tokens.weight"]
    assert_close(got, ref, 1e-10)
    assert got.n == got.n_tokens == T and got.n_examples == 4
    seq = fisher(model, data_, "empirical", task="causal_lm", progress=False)
    assert seq.n == 4 and seq.n_tokens == T
    mc = [fisher(model, data_, "mc", task="causal_lm", per="token", seed=1, backend=be, progress=False)
          for be in ("hooks", "loop")]
    assert_close(mc[0], mc[1], 1e-10)


def test_per_token_fisher_with_drawn_tokens_is_unbiased():
    """tokens_per_sequence draws tokens at random: all of them gives the full per-token Fisher
    exactly; fewer give an estimate whose mean over draws is the full one (every sequence has
    equally many counted tokens here, so each token is drawn with the same probability)."""
    model = llama()
    ids = torch.randint(1, 32, (3, 6), generator=torch.Generator().manual_seed(4))
    data_ = [({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, None)]
    full = fisher(model, data_, "empirical", task="causal_lm", per="token", progress=False)
    assert_close(fisher(model, data_, "empirical", task="causal_lm", per="token", progress=False,
                        tokens_per_sequence=5), full, 1e-12)
    draws = [fisher(model, data_, "empirical", task="causal_lm", per="token", progress=False,
                    tokens_per_sequence=2, seed=s) for s in range(300)]
    assert all(d.n == full.n == 15 for d in draws)  # N_t counts every token, drawn or not
    assert not torch.allclose(draws[0]["model.norm.weight"], full["model.norm.weight"])
    mean = {k: sum(d[k] for d in draws) / len(draws) for k in full}
    for k in ("model.norm.weight", "model.layers.1.mlp.down_proj.weight"):
        err = float((mean[k] - full[k]).norm() / full[k].norm())
        assert err < 0.1, (k, err)
    with pytest.raises(MergeError, match="tokens_per_sequence"):
        fisher(model, data_, "empirical", task="causal_lm", tokens_per_sequence=2, progress=False)
    with pytest.raises(MergeError, match="tokens_per_sequence"):
        fisher(model, data_, "empirical", task="causal_lm", per="token", tokens_per_sequence=0,
               progress=False)


def test_examples_without_a_counted_token_do_not_count():
    model = llama()
    inp = lm_batch()
    pad = {"input_ids": torch.cat([inp["input_ids"], torch.zeros(2, 7, dtype=torch.long)]),
           "attention_mask": torch.cat([inp["attention_mask"], torch.zeros(2, 7, dtype=torch.long)])}
    pad["attention_mask"][5, 3] = 1  # one real token and no next one: nothing to predict
    for be in ("hooks", "loop"):
        a = fisher(model, [(inp, None)], "empirical", task="causal_lm", backend=be, progress=False)
        b = fisher(model, [(pad, None)], "empirical", task="causal_lm", backend=be, progress=False)
        assert b.n == b.n_examples == 4
        assert_close(b, a, 1e-10)
    short = {"input_ids": inp["input_ids"][:, :1], "attention_mask": inp["attention_mask"][:, :1]}
    with pytest.raises(MergeError, match="no counted token"):
        fisher(model, [(short, None)], "empirical", task="causal_lm", progress=False)


def test_nan_inputs_raise():
    model = mlp()
    x, y = data("mlp", 4)
    x[2, 1] = float("nan")
    for kind in ("mc", "batch_squared"):
        with pytest.raises(MergeError, match="not finite"):
            fisher(model, [(x, y)], kind, progress=False)


class Branch(nn.Module):
    """A layer used only for some inputs (last feature above 5), first met after the check."""

    def __init__(self):
        super().__init__()
        self.fc, self.extra, self.head = nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        if bool((x[:, -1] > 5).all()):
            h = torch.tanh(self.extra(h.unsqueeze(0))[0])  # sequence-first-like [1, B, D]
        return self.head(h)


def test_a_layer_first_called_after_the_check_is_checked_then():
    torch.manual_seed(17)
    model = Branch().to(D64)
    x, y = data("mlp", 7)
    x[4:, -1] = 6.0
    hooks_vs_loop(model, [(x[:4], y[:4]), (x[4:], y[4:])], "exact")


class Positions(nn.Module):
    """Position embeddings of ids [1, L], broadcast over the batch (as BERT's and GPT-2's)."""

    def __init__(self):
        super().__init__()
        self.tok, self.pos, self.head = nn.Embedding(11, 6), nn.Embedding(8, 6), nn.Linear(6, 3)

    def forward(self, ids):
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1])[None])
        return self.head(torch.tanh(h).mean(1))


def test_a_layer_output_shared_by_the_batch_is_expanded_per_example():
    from toolkit.curvature import select_params
    from toolkit.persample import HookEngine
    torch.manual_seed(18)
    model = Positions().to(D64)
    g = torch.Generator().manual_seed(3)
    ids, y = torch.randint(0, 11, (5, 7), generator=g), torch.randint(0, 3, (5,), generator=g)
    hooks_vs_loop(model, [(ids, y)], "exact")
    chosen, _ = select_params(model, None)
    with HookEngine(model.eval(), chosen, {k: torch.zeros_like(p) for k, p in chosen.items()}) as eng:
        z = eng.forward(ids)
        eng.backward(z, torch.randn_like(z))
    assert eng.loop == [] and eng.expanded


def test_attention_key_bias_is_zero_up_to_rounding_and_stays_on_the_fast_path():
    """A key bias shifts every score of a query alike, which the softmax cancels: its gradient is
    rounding noise that no per-example rule reproduces. The check must accept it (relative to the
    pass's gradients), not send it through the per-example loop."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).eval()
    g = torch.Generator().manual_seed(1)
    data_ = [({"input_ids": torch.randint(1, 40, (6, 9), generator=g)}, torch.randint(0, 3, (6,), generator=g))
             for _ in range(2)]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = fisher(model, data_, "empirical", progress=False)
    assert not [x for x in w if "key.bias" in str(x.message)]
    ref = fisher(model, data_, "empirical", backend="loop", progress=False)
    top = max(float(v.max()) for v in ref.values())
    for k, v in ref.items():
        assert torch.allclose(got[k], v, rtol=1e-3, atol=1e-6 * top), k
    bias = "bert.encoder.layer.0.attention.self.key.bias"
    assert float(ref[bias].max()) < 1e-9 * top  # zero up to rounding
