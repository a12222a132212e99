"""HookPairGGN against the exact torch.func reference (float64, 1e-10 relative).

Model families: an MLP, a CNN, a residual CNN with eval-mode BatchNorm and in-place
operations, and a tiny torchvision VisionTransformer (LayerNorm, MultiheadAttention, class
token, positional embedding).
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from laplace.utils import Kron
from torch import nn

import laplace_metric  # noqa: F401  (registers the likelihoods)
from laplace_metric.curvature import HookPairGGN, KFACApproximation, ReferencePairGGN
from laplace_metric.curvature.folds import fold_input_factor, fold_output_factor
from laplace_metric.curvature.hooks import predictive_covariance
from laplace_metric.curvature.layers import unfold_input
from laplace_metric.curvature.reference import layer_sensitivities, output_columns
from laplace_metric.likelihoods import ContrastiveLikelihood
from tests.bruteforce import assert_close, rel_error
from tests.conftest import labelled_data, make_cnn, make_mlp

torch.set_num_threads(1)

TOL = 1e-10
METHODS = ["positives", "fixed", "full"]


class Block(nn.Module):
    """torchvision-style BasicBlock: in-place ReLU and ``out += identity``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class ResidualCNN(nn.Module):
    def __init__(self, out_dim: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.blocks = nn.Sequential(Block(3), Block(3))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        return self.fc(self.pool(self.blocks(x)).flatten(1))


def residual_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = ResidualCNN().double()
    with torch.no_grad():
        for sub in model.modules():
            if isinstance(sub, nn.BatchNorm2d):
                sub.running_mean.uniform_(-0.5, 0.5)
                sub.running_var.uniform_(0.5, 2.0)
                sub.weight.uniform_(0.5, 1.5)
                sub.bias.uniform_(-0.5, 0.5)
    return model.eval()


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=8,
        patch_size=4,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        mlp_dim=16,
        num_classes=3,
    ).double()
    with torch.no_grad():  # torchvision zeroes the head and uses tiny token initialisations
        model.heads.head.weight.normal_()
        model.class_token.normal_()
        model.encoder.pos_embedding.normal_()
    return model.eval()


MODELS = {
    "mlp": (make_mlp, (5,)),
    "cnn": (make_cnn, (1, 8, 8)),
    "rescnn": (residual_cnn, (1, 6, 6)),
    "vit": (tiny_vit, (3, 8, 8)),
}


def setup(name: str, method: str, device: torch.device, n: int = 10):
    build, shape = MODELS[name]
    model = build().to(device)
    x, y = labelled_data(n, shape)
    x, y = x.to(device), y.to(device)
    lik = ContrastiveLikelihood(hessian_method=method)
    if method != "positives":  # a partly active hinge: between the middle negative distances
        with torch.no_grad():
            z = lik.embed(model(x))
        first, second = torch.triu_indices(n, n, offset=1, device=device)
        neg = y[first] != y[second]
        dist = (z[first] - z[second]).square().sum(-1)[neg].sort().values
        middle = len(dist) // 2
        margin = float(dist[middle - 1 : middle + 1].mean())
        assert bool((dist < margin).any()) and bool((dist > margin).any())
        lik = ContrastiveLikelihood(margin=margin, hessian_method=method)
    return model, x, y, lik


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("location_gram", [False, True, "gram", "split"])
def test_diag_and_full_equal_the_reference(name, method, location_gram, device):
    """Every form of shared weights (per-column gradients, location Gram matrices of whole
    components, per-sample Grams with component sums; the latter only where every component
    is ``a I + b 1 1^T``, else the whole-component Gram)."""
    model, x, y, lik = setup(name, method, device)
    hooks, ref = HookPairGGN(model, lik), ReferencePairGGN(model, lik)
    hooks.location_gram = location_gram
    for structure in ("diag", "full"):
        got = getattr(hooks, structure)(x, y)
        want = getattr(ref, structure)(x, y)
        assert got.n_pairs == want.n_pairs > 0
        assert_close(got.hessian, want.hessian, TOL)
        assert torch.equal(got.loss, want.loss)


@pytest.mark.parametrize("name", ["mlp", "cnn", "rescnn"])
@pytest.mark.parametrize("method", METHODS)
def test_kron_expand_equals_the_reference(name, method, device):
    model, x, y, lik = setup(name, method, device)
    got = HookPairGGN(model, lik).kron(x, y).hessian
    assert_close(got, ReferencePairGGN(model, lik).kron(x, y).hessian, TOL)


def reference_layer_factors(model, x, y, lik, reduce=False):
    """Kronecker factors of every Linear/Conv weight the stock forward calls, written with the
    reference's sensitivities (independent of the hooks)."""
    terms = lik.graph_terms(model(x).detach(), y)
    inputs, sens = layer_sensitivities(model, x)
    layers = dict(model.named_modules())
    result = {}
    for name in sens:
        layer = layers[name]
        q = output_columns(layer, sens[name], terms.factor).permute(3, 0, 1, 2)
        cols = unfold_input(layer, inputs[name])
        if reduce:
            q, cols = q.sum(2, keepdim=True), cols.mean(1, keepdim=True)
        key = f"{name}.weight"
        result[key] = [fold_output_factor(q, terms.graph), fold_input_factor(cols, terms.graph)]
    return result


@pytest.mark.parametrize("method", METHODS)
def test_kron_vit(method, device):
    """Linear/Conv weights equal the reference's factorisation, 1-D parameters and the (1, ...)
    token parameters their exact dense block; the attention in-projection's input factor is
    the factor of the LayerNorm output it reads."""
    model, x, y, lik = setup("vit", method, device)
    got = HookPairGGN(model, lik).kron(x, y)
    full = ReferencePairGGN(model, lik).full(x, y).hessian
    layers = reference_layer_factors(model, x, y, lik)
    assert {"conv_proj.weight", "heads.head.weight"} <= set(layers)
    offset, checked = 0, 0
    for (name, param), factors in zip(model.named_parameters(), got.hessian.kfacs):
        size = param.numel()
        block = full[offset : offset + size, offset : offset + size]
        offset += size
        if name in layers:
            for a, b in zip(factors, layers[name]):
                assert rel_error(a, b) < TOL
            checked += 1
        elif param.ndim == 1:
            assert rel_error(factors[0], block) < TOL
            checked += 1
        elif param.shape[0] == 1:  # [[n_pairs]] (x) block / n_pairs
            assert factors[0].item() == got.n_pairs
            assert rel_error(torch.kron(factors[0], factors[1]), block) < TOL
            checked += 1
        else:
            assert "self_attention" in name and len(factors) == 2
    assert checked == sum(1 for _ in model.parameters()) - 2
    # in_proj's input factor: the LayerNorm output it reads, as the graph folds it
    ln_out = {}
    handle = model.encoder.layers[0].ln_1.register_forward_hook(
        lambda m, a, o: ln_out.setdefault("x", o.detach())
    )
    try:
        terms = lik.graph_terms(model(x).detach(), y)
    finally:
        handle.remove()
    names = [n for n, _ in model.named_parameters()]
    in_proj = got.hessian.kfacs[
        names.index("encoder.layers.encoder_layer_0.self_attention.in_proj_weight")
    ]
    assert rel_error(in_proj[1], fold_input_factor(ln_out["x"], terms.graph)) < TOL


@pytest.mark.parametrize("name", ["cnn", "vit"])
def test_kfac_reduce(name, device):
    model, x, y, lik = setup(name, "full", device)
    got = HookPairGGN(model, lik, kfac_approximation="reduce").kron(x, y).hessian
    want = reference_layer_factors(model, x, y, lik, reduce=True)
    names = [n for n, _ in model.named_parameters()]
    for key, factors in want.items():
        for a, b in zip(got.kfacs[names.index(key)], factors):
            assert rel_error(a, b) < TOL
    expand = HookPairGGN(model, lik).kron(x, y).hessian
    params = dict(model.named_parameters())
    conv = names.index([k for k in want if params[k].ndim == 4][0])
    assert rel_error(got.kfacs[conv][0], expand.kfacs[conv][0]) > 1e-3  # shared: differs
    with pytest.raises(ValueError, match="kfac_approximation"):
        HookPairGGN(model, lik, kfac_approximation="mean")
    assert HookPairGGN(model, lik, kfac_approximation=KFACApproximation.REDUCE)


@pytest.mark.parametrize("name", ["rescnn", "vit"])
def test_per_pair_path_and_small_memory_budget(name, device, monkeypatch):
    """The per-pair path (likelihoods that do not factor per sample) and a budget small enough
    to chunk columns, output rows and torch.func samples give the same results."""
    model, x, y, lik = setup(name, "full", device, n=8)
    ref = ReferencePairGGN(model, lik)
    want = {s: getattr(ref, s)(x, y).hessian for s in ("diag", "full")}
    pairwise = HookPairGGN(model, lik)
    pairwise.use_pair_graph = False
    tiny = HookPairGGN(model, lik)
    monkeypatch.setattr(tiny, "max_elements", 64)
    tiny_gram = HookPairGGN(model, lik)
    monkeypatch.setattr(tiny_gram, "max_elements", 64)
    tiny_gram.location_gram = True
    for backend in (pairwise, tiny, tiny_gram):
        for structure, value in want.items():
            assert_close(getattr(backend, structure)(x, y).hessian, value, TOL)
    if name == "rescnn":
        kron = ref.kron(x, y).hessian
        assert_close(pairwise.kron(x, y).hessian, kron, TOL)
        assert_close(tiny.kron(x, y).hessian, kron, TOL)


@pytest.mark.parametrize("name", ["mlp", "rescnn", "vit"])
@pytest.mark.parametrize("location_gram", [False, True])
def test_jacobians_and_predictive_covariance(name, location_gram, device):
    model, x, y, lik = setup(name, "positives", device)
    hooks, ref = HookPairGGN(model, lik), ReferencePairGGN(model, lik)
    hooks.location_gram = location_gram
    jac, z = ref.jacobians(x[:4])
    got_jac, got_z = hooks.jacobians(x[:4])
    assert rel_error(got_jac, jac) < TOL and rel_error(got_z, z) < TOL
    gen = torch.Generator().manual_seed(0)
    variances = torch.rand(jac.shape[-1], generator=gen, dtype=x.dtype).to(device)
    mean, cov = predictive_covariance(hooks, x[:4], variances)
    assert rel_error(mean, z) < TOL
    expected = torch.einsum("bdp,p,bep->bde", jac, variances, jac)
    assert rel_error(cov, expected) < TOL
    mean, var = predictive_covariance(hooks, x[:4], variances, diagonal=True)
    assert var.shape == (4, jac.shape[1]) and rel_error(mean, z) < TOL
    assert rel_error(var, torch.diagonal(expected, dim1=1, dim2=2)) < TOL
    kron = hooks.kron(x, y).hessian
    for damping in (False, True):
        precision = kron.decompose(damping=damping) * 3.0 + torch.tensor(0.7, dtype=x.dtype)
        precision.damping = damping
        _, cov = hooks.predictive_covariance(x[:4], precision)
        expected = precision.inv_square_form(jac)
        assert rel_error(cov, expected) < TOL
        _, var = hooks.predictive_covariance(x[:4], precision, diagonal=True)
        assert rel_error(var, torch.diagonal(expected, dim1=1, dim2=2)) < TOL
    with pytest.raises(TypeError, match="KronDecomposed"):
        predictive_covariance(hooks, x[:4], kron)


@pytest.mark.parametrize("name", ["mlp", "vit"])
def test_predictive_variances_without_normalisation(name, device):
    model, x, _, _ = setup(name, "positives", device)
    lik = ContrastiveLikelihood(normalize=False)
    hooks, ref = HookPairGGN(model, lik), ReferencePairGGN(model, lik)
    jac, g = ref.jacobians(x[:4])
    variances = torch.rand(jac.shape[-1], dtype=x.dtype, generator=torch.Generator().manual_seed(1))
    expected = torch.einsum("bdp,p,bep->bde", jac, variances.to(device), jac)
    mean, cov = hooks.predictive_covariance(x[:4], variances.to(device))
    assert rel_error(mean, g) < TOL and rel_error(cov, expected) < TOL
    _, var = hooks.predictive_covariance(x[:4], variances.to(device), diagonal=True)
    assert rel_error(var, torch.diagonal(expected, dim1=1, dim2=2)) < TOL


def test_user_model_untouched_and_tracked():
    model, x, y, lik = setup("vit", "positives", torch.device("cpu"))
    hooks = HookPairGGN(model, lik)
    before = hooks.diag(x, y).hessian
    for sub in model.modules():
        assert not sub._forward_hooks and not sub._backward_hooks
        assert "forward" not in vars(sub)
    with torch.no_grad():
        model.heads.head.weight.mul_(2.0)
    after = hooks.diag(x, y).hessian
    assert_close(after, ReferencePairGGN(model, lik).diag(x, y).hessian, TOL)
    assert rel_error(after, before) > 1e-3


def test_location_gram_is_checked():
    model, x, y, lik = setup("cnn", "positives", torch.device("cpu"))
    hooks = HookPairGGN(model, lik)
    hooks.location_gram = "grams"
    with pytest.raises(ValueError, match="location_gram must be"):
        hooks.diag(x, y)


def test_errors():
    lik = ContrastiveLikelihood()
    x, y = labelled_data(6, (2,))
    tokens = torch.randint(0, 5, (6, 2))
    model = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 2)).double()
    with pytest.raises(ValueError, match="'0.weight'"):
        HookPairGGN(model, lik).kron(tokens, y)
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).double().train()
    with pytest.raises(ValueError, match="training mode"):
        HookPairGGN(model, lik).diag(x, y)
    with pytest.raises(TypeError, match="tensor inputs"):
        HookPairGGN(model.eval(), lik)._record(model, {"x": x})


def test_fit_through_laplace():
    """The estimator accepts the backend (all-layer diag and kron on the residual CNN)."""
    from laplace import Laplace

    from tests.conftest import loader

    model = residual_cnn()
    x, y = labelled_data(12, (1, 6, 6))
    for structure in ("diag", "kron"):
        kwargs = dict(subset_of_weights="all", hessian_structure=structure)
        la = Laplace(model, "contrastive", backend=HookPairGGN, **kwargs)
        la.fit(loader(x, y, 6))
        ref = Laplace(model, "contrastive", backend=ReferencePairGGN, **kwargs)
        ref.fit(loader(x, y, 6))
        if structure == "diag":
            assert rel_error(la.H, ref.H) < TOL
        else:
            assert isinstance(la.H_facs, Kron)
            assert_close(la.H_facs, ref.H_facs, TOL)


@pytest.mark.parametrize("subset", ["last_layer", "subnetwork"])
def test_last_layer_and_subnetwork(subset):
    from laplace import Laplace

    from tests.conftest import loader

    model = tiny_vit()
    x, y = labelled_data(8, (3, 8, 8))
    kwargs = dict(subset_of_weights=subset, hessian_structure="diag")
    if subset == "subnetwork":
        kwargs["subnetwork_indices"] = torch.arange(0, 200, 7)
    fits = []
    for backend in (HookPairGGN, ReferencePairGGN):
        la = Laplace(model, "contrastive", backend=backend, **kwargs)
        la.fit(loader(x, y, 4))
        fits.append(la.H)
    assert rel_error(fits[0], fits[1]) < TOL


@pytest.mark.parametrize("fold", ["diag", "gram"])
@pytest.mark.parametrize("form", ["uniform", "general"])
def test_float32_folds_are_accurate_for_clustered_gradients(fold, form, device):
    """A Laplacian component folds centred, in both forms (uniform ``a I + b 1 1^T`` classes
    and bucketed general components): gradients of one class that agree to 1e-4 of their size
    lose nothing to cancellation in float32 (the uncentred form was off by 3000x)."""
    from laplace_metric.curvature import folds
    from laplace_metric.pairs import PairGraph

    gen = torch.Generator().manual_seed(0)
    n, labels = 16, torch.arange(16) % 4
    first, second = torch.triu_indices(n, n, offset=1)
    same = labels[first] == labels[second]
    weights = torch.full((int(same.sum()),), 0.5, dtype=torch.float64)
    if form == "general":  # unequal weights: no class is a I + b 1 1^T
        weights = 0.5 + torch.rand(len(weights), generator=gen, dtype=torch.float64)
    base = 10 * torch.randn(3, 1, 40, generator=gen, dtype=torch.float64)
    grads = (base + 1e-4 * torch.randn(3, n, 40, generator=gen, dtype=torch.float64)).to(device)
    grads32 = grads.float()

    def graph(dtype):
        g = PairGraph.from_pairs(first[same], second[same], weights.to(dtype), n)
        return PairGraph(*(m.to(device) for m in (g.matrix, g.input_matrix, g.output_matrix)), 1)

    plan = folds.fold_plan(graph(torch.float64))
    assert (plan.n_uniform, len(plan.general)) == ((4, 0) if form == "uniform" else (0, 1))
    fold = getattr(folds, f"fold_{fold}")
    reference = fold(grads32.double(), graph(torch.float64))
    ours = fold(grads32, graph(torch.float32))
    assert torch.equal(grads32, grads.float())  # the gradients are not modified in place
    assert rel_error(ours.double(), reference) < 1e-2
    explicit = sum(  # the pair sums, in float64
        w * (grads[:, a] - grads[:, b]).T @ (grads[:, a] - grads[:, b])
        for a, b, w in zip(first[same].tolist(), second[same].tolist(), weights.tolist())
    )
    explicit = explicit.diagonal() if fold is folds.fold_diag else explicit
    assert_close(fold(grads, graph(torch.float64)), explicit, TOL)


def test_location_gram_accumulators_share_one_bound(device, monkeypatch):
    """The Gram accumulators of all shared weights live across column chunks: together they
    keep at most ``4 * max_elements`` numbers, the rest take the per-column form (exact)."""
    model, x, y, lik = setup("rescnn", "positives", device)
    want = ReferencePairGGN(model, lik).diag(x, y).hessian
    plans = []
    plan = HookPairGGN._plan_location_grams
    monkeypatch.setattr(
        HookPairGGN,
        "_plan_location_grams",
        lambda self, *a: plans.append(plan(self, *a)) or plans[-1],
    )

    def kept(grams):
        return sum(t.numel() for gram, _ in grams.values() for t in gram.totals if t is not None)

    hooks = HookPairGGN(model, lik)
    hooks.location_gram = True
    assert_close(hooks.diag(x, y).hessian, want, TOL)
    everything = plans[-1]
    assert len(everything) >= 4 and kept(everything) > 0
    hooks.max_elements = kept(everything) // 8  # room for half of them
    assert_close(hooks.diag(x, y).hessian, want, TOL)
    assert 0 < len(plans[-1]) < len(everything)
    assert kept(plans[-1]) <= 4 * hooks.max_elements


def test_memory_budget_bounds_the_passes():
    """The estimator's ``memory_budget`` lowers ``max_elements`` (never raises it); the fit is
    the same, split into more passes."""
    import laplace

    model, x, y, _ = setup("rescnn", "positives", torch.device("cpu"))
    fits = {}
    for budget in ("100GB", 3 * 2**15 * 8 * HookPairGGN.MEMORY_PER_ELEMENT_BOUND):
        la = laplace.Laplace(
            model, "contrastive", "all", "diag", backend=HookPairGGN, memory_budget=budget
        )
        la.fit([(x, y)])
        fits[budget] = (la.H.clone(), la.backend.max_elements)
    (big, big_bound), (small, small_bound) = fits.values()
    assert big_bound == HookPairGGN.DEFAULT_MAX_ELEMENTS and small_bound == 3 * 2**15
    assert_close(small, big, TOL)
    backend = HookPairGGN(model, ContrastiveLikelihood())
    backend.max_elements = 100
    backend.memory_budget = 10**12
    assert backend.max_elements == 100  # a budget never raises the bound that was set


@pytest.mark.parametrize("weights", ["positives", "singletons"])
def test_split_gram_equals_the_per_column_fold(weights, device):
    """Per-sample location Grams plus component sums equal ``fold_diag`` of the per-sample
    gradients (uniform components of several sizes, singletons, several column chunks)."""
    from laplace_metric.curvature.folds import fold_diag
    from laplace_metric.curvature.hooks.locations import SplitGram
    from laplace_metric.pairs import PairGraph

    gen = torch.Generator().manual_seed(0)
    n, n_cols, n_loc, n_out, n_in = 11, 5, 3, 4, 6
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4])
    first, second = torch.triu_indices(n, n, offset=1)
    keep = labels[first] == labels[second]
    pair_weights = torch.rand(int(keep.sum()), generator=gen, dtype=torch.float64)
    if weights == "positives":  # equal weights inside a class: a I + b 1 1^T blocks
        pair_weights = 0.3 + labels[first[keep]].double()
    graph = PairGraph.from_pairs(
        first[keep].to(device), second[keep].to(device), pair_weights.to(device), n
    )
    if weights == "singletons":  # a diagonal graph (one-sided pairs)
        graph = PairGraph.from_pairs(
            first[keep].to(device), second[keep].to(device), pair_weights.to(device), n, True
        )
    q = torch.randn(n_cols, n, n_loc, n_out, generator=gen, dtype=torch.float64).to(device)
    x = torch.randn(n, n_loc, n_in, generator=gen, dtype=torch.float64).to(device)
    grads = torch.einsum("cbto,bti->cboi", q, x)
    split = SplitGram(graph, n_loc, 7, x)  # a tiny bound: output rows in several blocks
    for chunk in q.split(2):
        split.add(chunk)
    assert_close(split.diag(x), fold_diag(grads, graph), TOL)
