"""``LowRankLinear`` (W = scale·B·A), ``to_low_rank`` (nn.Linear → LowRankLinear) and ``merge`` (the reverse).

A low-rank layer of rank r stores B (out_features × r) and A (r × in_features) instead of W (out_features ×
in_features): r·(m + n) parameters instead of m·n, and its forward ``scale·B(Ax)`` costs 2·r·(m + n) flops per
token instead of 2·m·n.
"""

from __future__ import annotations

import fnmatch
import inspect
import math
from collections import defaultdict
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DEFAULT_TARGETS", "EXCLUDED_NAMES", "LowRankLinear", "merge", "to_low_rank"]

# By default every linear layer inside the model's repeated blocks is factored (the elements of an nn.ModuleList: a
# transformer's layers, whatever its projections are called), and, in a model without such a list, the layers of
# these names (matched against the last component of a module's name): LLaMA/Mistral (q/k/v/o_proj,
# gate/up/down_proj), GPT-2 (c_attn, c_proj, c_fc), BERT (query, key, value), OPT/ViT/CLIP (fc1, fc2, out_proj).
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "gate_proj", "up_proj", "down_proj", "c_attn",
                   "c_proj", "c_fc", "query", "key", "value", "fc1", "fc2")
# Never factored by the default targets: token/position embeddings, the output head, and a mixture of experts'
# routers and gates (one output per expert, or one).
EXCLUDED_NAMES = ("lm_head", "embed_out", "output", "head", "classifier", "score", "wte", "wpe", "embed_tokens",
                  "embeddings", "gate", "*_gate", "router")

Target = Sequence[str] | str | Callable[[str, nn.Module], bool] | None


class LowRankLinear(nn.Module):
    r"""A linear layer whose weight is the product of two trained factors: ``y = scale·B(A x) + bias``.

    Shapes: x (..., in_features) → y (..., out_features); ``A`` (rank × in_features), ``B`` (out_features × rank),
    ``bias`` (out_features). The dense weight ``scale·B·A`` is never formed.

    Initialization (variance of ``nn.Linear``'s default, Var W_ij = 1/(3·in_features)):
    ``A ~ U(−√(3/in), √(3/in))`` (Var 1/in, so A x keeps the scale of x) and
    ``B ~ U(−1/(scale·√r), 1/(scale·√r))`` (Var 1/(3·r·scale²)); then
    Var(scale·Σ_k B_ik A_kj) = scale²·r·(1/(3·r·scale²))·(1/in) = 1/(3·in). The bias is ``nn.Linear``'s,
    U(−1/√in, 1/√in).

    Args:
        in_features, out_features: as ``nn.Linear``.
        rank: r, with 1 <= r < min(in_features, out_features) (a factorization of rank >= min(m, n) saves nothing).
        bias: add a learned bias.
        scale: a constant multiplier of the product (not trained); with AdamW it sets the effective learning rate of
            W relative to the factors' (the update of W is about scale·(ΔB·A + B·ΔA)).

    ``dense_type`` is the module ``merge`` rebuilds: ``nn.Linear``, or the Hugging Face ``Conv1D`` class the layer
    was converted from (``from_linear``), so that a merged GPT-2 loads into ``GPT2LMHeadModel`` again.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, scale: float = 1.0,
                 device=None, dtype=None):
        super().__init__()
        _check_rank(rank, out_features, in_features, "LowRankLinear")
        _check_scale(scale, "LowRankLinear")
        factory = dict(device=device, dtype=dtype)
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.scale = float(scale)
        self.dense_type: type[nn.Module] = nn.Linear
        self.B = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.A = nn.Parameter(torch.empty(rank, in_features, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw A, B (and bias) as described in the class docstring."""
        a_bound = math.sqrt(3.0 / self.in_features)
        b_bound = 1.0 / (self.scale * math.sqrt(self.rank))
        nn.init.uniform_(self.A, -a_bound, a_bound)
        nn.init.uniform_(self.B, -b_bound, b_bound)
        if self.bias is not None:
            bias_bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bias_bound, bias_bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(F.linear(x, self.A), self.B)
        if self.scale != 1.0:
            y = y * self.scale
        if self.bias is not None:
            y = y + self.bias
        return y

    @torch.no_grad()
    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight scale·B·A (out_features × in_features), computed in float32 at least."""
        work = torch.promote_types(self.B.dtype, torch.float32)
        dense = (self.B.to(work) @ self.A.to(work)) * self.scale
        return dense.to(dtype or self.B.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}, scale={self.scale:g}")

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, *, scale: float = 1.0, init: str = "random") -> "LowRankLinear":
        """A LowRankLinear on ``linear``'s device and dtype, with its bias copied.

        ``linear`` is an ``nn.Linear`` or a Hugging Face GPT-2 ``Conv1D`` (``x @ W + b`` with W (in, out): its
        transpose is the linear weight).

        ``init="random"`` draws fresh factors (pre-training from scratch); ``init="svd"`` sets scale·B·A to the best
        rank-r approximation of ``linear.weight`` (truncated SVD in float32 or float64: W ≈ U_r Σ_r V_rᵀ,
        B = U_r √Σ_r / √scale, A = √Σ_r V_rᵀ / √scale).
        """
        if init not in ("random", "svd"):
            raise ValueError(f"init must be 'random' or 'svd', got {init!r}")
        weight = linear_weight(linear)
        if init == "svd":
            _check_svd_weight(weight, "LowRankLinear.from_linear")
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, rank, bias=linear.bias is not None, scale=scale,
                    device=weight.device, dtype=weight.dtype)
        if is_conv1d(linear):
            layer.dense_type = type(linear)
        with torch.no_grad():
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
            if init == "svd":
                work = torch.promote_types(weight.dtype, torch.float32)
                U, S, Vh = torch.linalg.svd(weight.detach().to(work), full_matrices=False)
                root = (S[:rank] / layer.scale).sqrt()
                layer.B.copy_(U[:, :rank] * root)
                layer.A.copy_(root[:, None] * Vh[:rank])
        # a frozen layer's factors are frozen too (fine-tuning some layers of a converted model)
        layer.B.requires_grad_(weight.requires_grad)
        layer.A.requires_grad_(weight.requires_grad)
        if linear.bias is not None:
            layer.bias.requires_grad_(linear.bias.requires_grad)
        layer.train(linear.training)
        return layer


def _check_rank(rank, out_features: int, in_features: int, where: str) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"{where}: rank must be an int, got {type(rank).__name__}")
    smallest = min(out_features, in_features)
    if rank <= 0 or rank >= smallest:
        raise ValueError(
            f"{where}: rank must satisfy 1 <= rank < min(out_features, in_features) = {smallest} for a "
            f"{out_features}x{in_features} weight, got rank={rank}; a factorization of rank >= {smallest} has more "
            "parameters than the dense weight (choose a smaller rank or leave this layer out of target)"
        )


def _check_scale(scale, where: str) -> None:
    if isinstance(scale, bool) or not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"{where}: scale must be a finite number > 0, got {scale!r}")


def _check_svd_weight(weight: torch.Tensor, where: str) -> None:
    """init="svd" factors the weight's values: a meta weight has none, and NaN or inf cannot be factored."""
    if weight.device.type == "meta":
        raise ValueError(f"{where}: the weight is a meta tensor (shapes only, no values), which init='svd' cannot "
                         "factor. Nothing was converted; load the weights first (model.to_empty(device=...) and "
                         "load_state_dict) or use init='random'")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{where}: the weight holds NaN or inf, which init='svd' cannot factor. Nothing was "
                         "converted; fix the weight or use init='random'")


def check_factors(layer: "LowRankLinear", where: str) -> None:
    """The factors and bias of ``layer`` as its forward and ``merge`` read them: B (out_features × r) and A (r ×
    in_features) of one r, floating point, one dtype and device, and a bias of out_features entries or None. A
    factor assigned by hand (``layer.B = nn.Parameter(...)``) can break any of these."""
    B, A, bias = layer.B, layer.A, layer.bias
    for name, factor in (("B", B), ("A", A)):
        if not isinstance(factor, torch.Tensor) or factor.dim() != 2 or not factor.is_floating_point():
            got = f"{factor.dtype} of shape {tuple(factor.shape)}" if isinstance(factor, torch.Tensor) else \
                type(factor).__name__
            raise ValueError(f"{where}: factor {name} must be a 2-D floating-point tensor, got {got}")
    if B.shape[0] != layer.out_features or A.shape[1] != layer.in_features or B.shape[1] != A.shape[0]:
        raise ValueError(f"{where}: the factors are B {tuple(B.shape)} and A {tuple(A.shape)}; a layer of "
                         f"out_features={layer.out_features} and in_features={layer.in_features} needs B "
                         f"({layer.out_features}, r) and A (r, {layer.in_features}) of one rank r (the layer's rank "
                         f"is {layer.rank}). Nothing was changed; assign factors of matching shapes")
    if A.dtype != B.dtype or A.device != B.device:
        raise ValueError(f"{where}: factor B is {B.dtype} on {B.device} but A is {A.dtype} on {A.device}; they must "
                         "match. Nothing was changed")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (layer.out_features,)):
        got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"{where}: the bias must be None or of shape ({layer.out_features},), got {got}. Nothing "
                         "was changed")


def _matches(name: str, patterns: Sequence[str]) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(leaf, p) for p in patterns)


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2's c_attn, c_proj, c_fc): a linear layer ``x @ W + b`` with W (in, out)."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(weight, torch.Tensor)
            and weight.dim() == 2)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The (out_features, in_features) weight of an ``nn.Linear``, or the transposed view of a ``Conv1D``'s."""
    return module.weight.T if is_conv1d(module) else module.weight


def _computes_otherwise(module: nn.Module) -> str | None:
    """Why a linear layer computes something other than ``x Wᵀ + b`` of its own weight (None if it does not): a
    subclass with its own ``forward`` (a scaled or quantized layer), or a parametrized weight (``orthogonal``,
    ``weight_norm``: the weight is a function of other tensors)."""
    if isinstance(module, nn.Linear) and type(module).forward is not nn.Linear.forward:
        return f"a {type(module).__name__} whose forward is its own"
    if torch.nn.utils.parametrize.is_parametrized(module, "weight"):
        return "whose weight is parametrized (torch.nn.utils.parametrize)"
    return None


def _embedding_weights(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}


def _shared_weights(model: nn.Module) -> dict[int, list[str]]:
    """``id(weight) -> names`` of the weights that two or more distinct linear modules hold (layers tied to each
    other, not a module reused in several places): factoring each on its own would untie them."""
    holders: dict[int, list[str]] = defaultdict(list)
    for name, module in model.named_modules():  # a module reached twice is listed once
        if isinstance(module, nn.Linear) or is_conv1d(module):
            holders[id(module.weight)].append(name)
    return {key: names for key, names in holders.items() if len(names) > 1}


def _block_members(model: nn.Module) -> set[str]:
    """Qualified names of the modules strictly inside an element of an ``nn.ModuleList``: the layers of a model's
    repeated blocks (``layers.0.self_attn.q_proj``), not the elements themselves (a list of heads, ``heads.0``)."""
    names = set()
    for list_name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            for index, block in module.named_children():
                prefix = f"{list_name}.{index}" if list_name else index
                names.update(f"{prefix}.{inner}" for inner, _ in block.named_modules() if inner)
    return names


def _weight_read_by_parent(model: nn.Module) -> dict[int, str]:
    """Linear children whose parent's ``forward`` reads ``self.<child>.weight`` instead of only calling the child,
    by the parent's class: ``nn.MultiheadAttention``'s ``out_proj`` (passed to ``F.multi_head_attention_forward``),
    T5's feed-forward ``wo`` (its dtype is read). A ``LowRankLinear`` has no ``weight``, so these stay dense."""
    readers: dict[type, str] = {}
    found = {}
    for parent in model.modules():
        cls = type(parent)
        if cls not in readers:
            try:
                readers[cls] = inspect.getsource(cls.forward)
            except (OSError, TypeError):  # no source (a C extension, a lambda): nothing known to be read
                readers[cls] = ""
        for child_name, child in parent.named_children():
            if (isinstance(child, nn.Linear) or is_conv1d(child)) and f"self.{child_name}.weight" in readers[cls]:
                found[id(child)] = cls.__name__
    return found


def find_targets(model: nn.Module, target: Target = None) -> list[tuple[str, nn.Module]]:
    """The ``(qualified name, module)`` pairs of ``model`` that ``to_low_rank`` would replace, in module order.

    The modules are ``nn.Linear`` layers, or Hugging Face GPT-2 ``Conv1D`` layers (linear with a transposed weight).

    ``target`` is ``None`` (every linear layer inside an element of an ``nn.ModuleList``, a transformer's blocks,
    and any named in ``DEFAULT_TARGETS``, excluding ``EXCLUDED_NAMES``), a name pattern or a list of them
    (``fnmatch`` patterns matched against the full name, e.g. ``"layers.*.mlp.*"``, or against its last component,
    e.g. ``"q_proj"``), or a predicate ``(name, module) -> bool``. Matched modules that are not ``nn.Linear`` but
    hold a weight (embeddings, convolutions) are an error; matched containers are looked into by their children's
    own names only. A linear layer whose weight is shared with an embedding (a tied output head) is never replaced,
    nor by default a layer whose weight another linear layer holds too (tied layers), a layer whose parent's
    forward reads its ``weight`` (``nn.MultiheadAttention``'s ``out_proj``, T5's ``wo``) or one that computes
    something else than ``x Wᵀ + b`` (an ``nn.Linear`` subclass with its own ``forward``, a parametrized weight);
    a target that names one of those is an error.
    """
    if isinstance(target, str):
        target = [target]
    if target is None:
        blocks = _block_members(model)

        def matched(name, module):
            if name in blocks:  # BERT's layer.0.attention.output.dense: a block's own "output"
                return (isinstance(module, nn.Linear) or is_conv1d(module)) and not _matches(name, EXCLUDED_NAMES)
            # outside the blocks, anything inside a head is excluded too (RoBERTa's classifier.out_proj)
            return _matches(name, DEFAULT_TARGETS) and not any(
                _matches(component, EXCLUDED_NAMES) for component in name.split("."))
    elif callable(target):
        matched = target
    else:
        patterns = list(target) if isinstance(target, Iterable) and not isinstance(target, (bytes, dict)) else []
        if not patterns or not all(isinstance(p, str) for p in patterns):
            raise TypeError(f"to_low_rank: target must be a non-empty list of name patterns or a predicate, got "
                            f"{target!r}")

        def matched(name, module):
            return _matches(name, patterns)
    tied = _embedding_weights(model)
    shared = _shared_weights(model)
    read_by_parent = _weight_read_by_parent(model)
    found = []
    for name, module in model.named_modules():
        if not name or not matched(name, module):
            continue
        if isinstance(module, nn.Linear) or is_conv1d(module):
            if id(module.weight) in tied:
                continue
            if id(module.weight) in shared:
                if target is None:
                    continue
                others = [other for other in shared[id(module.weight)] if other != name]
                raise ValueError(f"to_low_rank: target matched {name!r}, whose weight is also the weight of "
                                 f"{', '.join(repr(o) for o in others)} (tied layers); factoring each layer on its own "
                                 "would untie them and change the model. Narrow target so that it leaves them out")
            if id(module) in read_by_parent:
                if target is None:
                    continue
                leaf = name.rsplit(".", 1)[-1]
                raise ValueError(f"to_low_rank: target matched {name!r}, whose parent ({read_by_parent[id(module)]}) "
                                 f"reads self.{leaf}.weight in its forward; a LowRankLinear has no dense weight, so "
                                 "this layer cannot be factored. Narrow target so that it leaves this layer out")
            computes = _computes_otherwise(module)
            if computes is not None:
                if target is None:
                    continue
                raise ValueError(f"to_low_rank: target matched {name!r}, {computes}; a LowRankLinear computes "
                                 "x (scale·B·A)ᵀ + b only, so factoring it would change the model. Narrow target so "
                                 "that it leaves this layer out")
            found.append((name, module))
        elif isinstance(module, LowRankLinear):
            continue
        elif isinstance(getattr(module, "weight", None), torch.Tensor):
            weight = module.weight
            raise ValueError(
                f"to_low_rank: target matched {name!r}, a {type(module).__name__} with a {weight.dim()}-D weight of "
                f"shape {tuple(weight.shape)}; only nn.Linear layers (2-D weights) can be factored. Narrow target "
                "(a list of name patterns or a predicate) so that it selects linear layers only"
            )
    return found


def to_low_rank(model: nn.Module, rank: int, *, target: Target = None, scale: float = 1.0,
                init: str = "random") -> nn.Module:
    """Replace the targeted ``nn.Linear`` modules of ``model`` by ``LowRankLinear`` of the given rank, in place.

    GPT-2's ``Conv1D`` layers (Hugging Face) count as linear layers: they become ``LowRankLinear`` too (and
    ``merge`` turns them back into ``Conv1D``).

    Returns ``model``. Default targets: the linear layers of the model's blocks (``find_targets``); embeddings
    and the output head are never chosen by default (see ``find_targets`` for ``target``). ``init="random"``
    (default, pre-training from scratch) or ``"svd"`` (truncated SVD of the existing weight). Every target is checked
    before any module is replaced: a rank outside [1, min(m, n)) for some layer, or a model without targets, raises
    and leaves the model unchanged. Build the optimizer after this call: the replaced weights are new parameters.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_low_rank: model must be an nn.Module (converted in place), got {type(model).__name__}")
    if init not in ("random", "svd"):
        raise ValueError(f"to_low_rank: init must be 'random' or 'svd', got {init!r}")
    _check_scale(scale, "to_low_rank")
    targets = find_targets(model, target)
    if not targets:
        described = ("the default targets (linear layers inside an nn.ModuleList of blocks, or named "
                     + ", ".join(DEFAULT_TARGETS) + ")" if target is None else f"target={target!r}")
        read = _weight_read_by_parent(model)
        unfactorable = (f" ({len(read)} linear layers are left out because their parents read their weight: "
                        f"{', '.join(sorted(set(read.values())))})" if read and target is None else "")
        raise ValueError(f"to_low_rank: no nn.Linear module of {type(model).__name__} matches {described}"
                         f"{unfactorable}; pass target= a list of name patterns (see model.named_modules()) or a "
                         "predicate")
    for name, linear in targets:
        _check_rank(rank, *linear_weight(linear).shape, f"to_low_rank ({name})")
        weight = linear_weight(linear)
        if not weight.is_floating_point():
            raise ValueError(f"to_low_rank ({name}): the weight is {weight.dtype}; only floating-point layers can be "
                             "factored. Nothing was converted; leave this layer out of target")
        if init == "svd":
            _check_svd_weight(weight, f"to_low_rank ({name})")
    # Every new layer is built (init="svd" factors each weight) before the first is swapped in, so a layer that
    # fails leaves the model unchanged.
    replacements = []
    for name, linear in targets:
        try:
            replacements.append((name, LowRankLinear.from_linear(linear, rank, scale=scale, init=init)))
        except (RuntimeError, ValueError) as error:
            raise ValueError(f"to_low_rank ({name}): building its LowRankLinear failed ({error}); nothing was "
                             "converted") from error
    for name, layer in replacements:
        _replace(model, name, layer)
    return model


def merge(model: nn.Module) -> nn.Module:
    """Replace every ``LowRankLinear`` of ``model`` by a dense layer with weight scale·B·A, in place.

    The dense layer is the layer's ``dense_type``: an ``nn.Linear``, or the Hugging Face ``Conv1D`` it was converted
    from (weight (in, out), the transpose), so that the merged model's ``state_dict`` is the original architecture's.
    Returns ``model`` (or the new layer when ``model`` itself is a LowRankLinear). The product is computed in
    float32 (float64 for float64 factors) and rounded once to the factors' dtype.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"merge: model must be an nn.Module (converted in place), got {type(model).__name__}")
    if isinstance(model, LowRankLinear):
        check_factors(model, "merge")
        return _to_dense(model)
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, LowRankLinear)]
    for name, module in layers:
        check_factors(module, f"merge ({name})")
    # every dense layer is built before the first is swapped in: a failure leaves the model unchanged
    replacements = [(name, _to_dense(module)) for name, module in layers]
    for name, layer in replacements:
        _replace(model, name, layer)
    return model


def _to_dense(layer: LowRankLinear) -> nn.Module:
    if layer.dense_type is nn.Linear:
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                          device=layer.B.device, dtype=layer.B.dtype)
    else:  # Conv1D(nf=out_features, nx=in_features), whose bias always exists (zeros when the factors had none)
        try:
            dense = layer.dense_type(layer.out_features, layer.in_features).to(device=layer.B.device,
                                                                               dtype=layer.B.dtype)
        except (TypeError, ValueError, RuntimeError):
            dense = None
        if not is_conv1d(dense) or tuple(dense.weight.shape) != (layer.in_features, layer.out_features):
            raise ValueError(f"merge: {layer.dense_type.__name__}({layer.out_features}, {layer.in_features}) has no "
                             f"({layer.in_features}, {layer.out_features}) weight as a Hugging Face Conv1D does; "
                             "nothing was changed. Set the layer's dense_type = torch.nn.Linear to merge into one")
    with torch.no_grad():
        linear_weight(dense).copy_(layer.dense_weight())
        if layer.bias is not None:
            dense.bias.copy_(layer.bias)
        elif dense.bias is not None:
            dense.bias.zero_()
    # a frozen layer stays frozen: the weight trains if either factor did, the bias as it did
    linear_weight(dense).requires_grad_(layer.B.requires_grad or layer.A.requires_grad)
    if dense.bias is not None and layer.bias is not None:
        dense.bias.requires_grad_(layer.bias.requires_grad)
    dense.train(layer.training)
    return dense


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` wherever the module at ``name`` is: a module reused in several places (one layer applied
    twice) is one layer, and ``named_modules`` lists only its first place."""
    old = model.get_submodule(name)
    for parent in model.modules():
        # _modules, not named_children(), which also lists a child held under two names once
        for child_name, child in list(parent._modules.items()):
            if child is old:
                setattr(parent, child_name, module)


def low_rank_modules(model_or_modules: nn.Module | Iterable[nn.Module]) -> list[LowRankLinear]:
    """Every distinct ``LowRankLinear`` in a model (or in an iterable of modules), in module order."""
    roots = [model_or_modules] if isinstance(model_or_modules, nn.Module) else list(model_or_modules)
    found, seen = [], set()
    for root in roots:
        if not isinstance(root, nn.Module):
            raise TypeError(f"expected an nn.Module or an iterable of them, got {type(root).__name__}")
        for module in root.modules():
            if isinstance(module, LowRankLinear) and id(module) not in seen:
                seen.add(id(module))
                found.append(module)
    return found
