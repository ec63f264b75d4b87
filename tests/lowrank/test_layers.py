"""LowRankLinear, to_low_rank and merge: shapes, forward math, initialization variance, targeting, bad input."""

from __future__ import annotations

import copy
import math
import tempfile

import pytest
import torch
from torch import nn

import optim
from optim.lowrank import LowRankLinear, find_targets, merge, to_low_rank


class Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x):
        return self.o_proj(self.q_proj(x) + self.k_proj(x) * self.v_proj(x))


class Block(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.self_attn = Attention(d)
        self.mlp = nn.ModuleDict(dict(gate_proj=nn.Linear(d, f), up_proj=nn.Linear(d, f), down_proj=nn.Linear(f, d)))
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        x = x + self.self_attn(self.norm(x))
        mlp = self.mlp
        return x + mlp["down_proj"](torch.nn.functional.silu(mlp["gate_proj"](x)) * mlp["up_proj"](x))


class TinyLM(nn.Module):
    def __init__(self, vocab=50, d=16, f=24, layers=2, tie=False):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d, f) for _ in range(layers))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, tokens):
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


def test_shapes_parameters_and_repr():
    layer = LowRankLinear(12, 7, 3, scale=0.5)
    assert layer.B.shape == (7, 3) and layer.A.shape == (3, 12) and layer.bias.shape == (7,)
    assert [name for name, _ in layer.named_parameters()] == ["B", "A", "bias"]
    assert repr(layer) == "LowRankLinear(in_features=12, out_features=7, rank=3, bias=True, scale=0.5)"
    no_bias = LowRankLinear(12, 7, 3, bias=False, dtype=torch.float64)
    assert no_bias.bias is None and no_bias.A.dtype == torch.float64
    assert [name for name, _ in no_bias.named_parameters()] == ["B", "A"]


def test_forward_is_scaled_product_plus_bias():
    layer = LowRankLinear(10, 6, 2, scale=0.25, dtype=torch.float64)
    x = torch.randn(4, 5, 10, dtype=torch.float64)
    expected = x @ (0.25 * layer.B @ layer.A).T + layer.bias
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.dense_weight(), 0.25 * layer.B @ layer.A)


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_init_has_nn_linear_variance(scale):
    """Var(W_ij) of the product matches nn.Linear's default 1/(3·in) (checked over many entries)."""
    fan_in, fan_out, rank = 256, 512, 32
    layer = LowRankLinear(fan_in, fan_out, rank, scale=scale)
    variance = layer.dense_weight().var().item()
    linear_variance = nn.Linear(fan_in, fan_out).weight.var().item()
    assert variance == pytest.approx(1.0 / (3 * fan_in), rel=0.05)
    assert variance == pytest.approx(linear_variance, rel=0.05)
    bound = 1 / math.sqrt(fan_in)
    assert layer.bias.abs().max() <= bound


def test_to_low_rank_default_targets_skip_embedding_and_head():
    model = TinyLM()
    names = [name for name, _ in find_targets(model)]
    assert len(names) == 2 * 7 and all(".self_attn." in n or ".mlp." in n for n in names)
    to_low_rank(model, 4)
    low = [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
    assert low == names
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.embed_tokens, nn.Embedding)
    assert model(torch.randint(0, 50, (2, 5))).shape == (2, 5, 50)
    assert model.layers[0].mlp["gate_proj"].bias is not None  # biases follow the replaced layer


def test_to_low_rank_target_patterns_and_predicate():
    model = to_low_rank(TinyLM(), 3, target=["layers.0.mlp.*"])
    assert [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)] == [
        "layers.0.mlp.gate_proj", "layers.0.mlp.up_proj", "layers.0.mlp.down_proj"]
    model = to_low_rank(TinyLM(), 3, target=lambda name, module: name.endswith("q_proj"))
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == 2
    # An explicit pattern may select the output head; a head tied to the embedding is never replaced.
    assert isinstance(to_low_rank(TinyLM(), 3, target="lm_head").lm_head, LowRankLinear)
    with pytest.raises(ValueError, match="no nn.Linear module"):
        to_low_rank(TinyLM(tie=True), 3, target="lm_head")


def test_svd_init_is_best_rank_r_approximation_and_merge_roundtrip():
    torch.manual_seed(0)
    model = TinyLM()
    dense = copy.deepcopy(model)
    to_low_rank(model, 8, init="svd", scale=0.5)
    layer = model.layers[1].self_attn.k_proj
    weight = dense.layers[1].self_attn.k_proj.weight.detach()
    U, S, Vh = torch.linalg.svd(weight)
    best = U[:, :8] @ torch.diag(S[:8]) @ Vh[:8]
    torch.testing.assert_close(layer.dense_weight(), best, atol=1e-5, rtol=1e-5)
    merged = merge(model)
    assert not any(isinstance(m, LowRankLinear) for m in merged.modules())
    torch.testing.assert_close(merged.layers[1].self_attn.k_proj.weight, best, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged.layers[1].mlp["up_proj"].bias, dense.layers[1].mlp["up_proj"].bias)


def test_merge_keeps_the_function():
    model = to_low_rank(TinyLM(), 5)
    tokens = torch.randint(0, 50, (3, 6))
    before = model(tokens)
    merge(model)
    torch.testing.assert_close(model(tokens), before, atol=1e-5, rtol=1e-5)
    single = LowRankLinear(6, 4, 2)
    assert isinstance(merge(single), nn.Linear)


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 ``Conv1D`` layout (``transformers.pytorch_utils.Conv1D``): x @ W + b, W of (in, out)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf, dtype=torch.float64) / nx**0.5)
        self.bias = nn.Parameter(torch.randn(nf, dtype=torch.float64))

    def forward(self, x):
        return x @ self.weight + self.bias


class GPT2Block(nn.Module):
    def __init__(self, d, rank):
        super().__init__()
        self.c_attn, self.c_proj = Conv1D(3 * d, d), Conv1D(d, 3 * d)
        with torch.no_grad():  # c_attn of exact rank `rank`: the SVD initialization then reproduces it
            self.c_attn.weight.copy_(torch.randn(d, rank, dtype=torch.float64) @ torch.randn(rank, 3 * d,
                                                                                          dtype=torch.float64))

    def forward(self, x):
        return self.c_proj(torch.tanh(self.c_attn(x)))


def test_gpt2_conv1d_layers_are_linear_targets():
    torch.manual_seed(0)
    block = GPT2Block(8, 4)
    x = torch.randn(5, 8, dtype=torch.float64)
    attn_before = block.c_attn(x)
    assert [name for name, _ in find_targets(block)] == ["c_attn", "c_proj"]
    to_low_rank(block, 4, init="svd")
    assert isinstance(block.c_attn, LowRankLinear) and (block.c_attn.in_features, block.c_attn.out_features) == (8, 24)
    assert (block.c_proj.in_features, block.c_proj.out_features) == (24, 8)
    torch.testing.assert_close(block.c_attn(x), attn_before, atol=1e-10, rtol=1e-10)  # exact rank 4
    low_rank_out = block(x)
    merge(block)  # back to the layers it came from, weights (in, out), so the original state_dict keys fit
    assert type(block.c_attn) is Conv1D and type(block.c_proj) is Conv1D
    assert block.c_attn.weight.shape == (8, 24) and block.c_proj.weight.shape == (24, 8)
    assert block.c_attn.weight.dtype == torch.float64
    torch.testing.assert_close(block(x), low_rank_out, atol=1e-10, rtol=1e-10)
    GPT2Block(8, 4).load_state_dict(block.state_dict())
    with pytest.raises(ValueError, match="rank"):
        to_low_rank(GPT2Block(8, 4), 8)  # c_proj is 24 -> 8: rank 8 is not below min(m, n)


def test_real_gpt2_converts_when_transformers_is_installed():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    model = transformers.GPT2LMHeadModel(config).eval()
    tokens = torch.randint(0, 64, (2, 8))
    to_low_rank(model, 8)
    names = [name for name, m in model.named_modules() if isinstance(m, LowRankLinear)]
    assert sorted(n.rsplit(".", 1)[-1] for n in names) == ["c_attn", "c_fc", "c_proj", "c_proj"]
    low_rank_logits = model(tokens).logits
    assert torch.isfinite(low_rank_logits).all()
    merge(model)  # a merged GPT-2 is a GPT-2 checkpoint again: save_pretrained / from_pretrained round-trips
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        loaded = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
    torch.testing.assert_close(loaded(tokens).logits, low_rank_logits, atol=1e-5, rtol=1e-5)


def test_merge_refuses_a_dense_type_it_cannot_rebuild_and_changes_nothing():
    block = to_low_rank(GPT2Block(8, 4), 4)
    block.c_proj.dense_type = nn.Conv1d  # not a (nf, nx) Conv1D
    with pytest.raises(ValueError, match="dense_type"):
        merge(block)
    assert isinstance(block.c_attn, LowRankLinear) and isinstance(block.c_proj, LowRankLinear)
    block.c_proj.dense_type = nn.Linear
    merge(block)
    assert type(block.c_attn) is Conv1D and type(block.c_proj) is nn.Linear


@pytest.mark.parametrize("rank", [0, -1, 16, 17])
def test_bad_rank_raises_and_changes_nothing(rank):
    model = TinyLM()  # smallest target is 16x16
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=r"1 <= rank < min\(out_features, in_features\) = 16"):
        to_low_rank(model, rank)
    assert [type(m) for m in model.modules()] == before
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear(16, 16, rank)


def test_bad_inputs():
    with pytest.raises(TypeError, match="rank must be an int"):
        to_low_rank(TinyLM(), 2.5)
    with pytest.raises(ValueError, match="no nn.Linear module of Sequential matches the default targets"):
        to_low_rank(nn.Sequential(nn.Linear(4, 4)), 2)
    with pytest.raises(ValueError, match="only nn.Linear layers"):
        to_low_rank(TinyLM(), 2, target=["embed_tokens", "q_proj"])
    with pytest.raises(ValueError, match="init must be"):
        to_low_rank(TinyLM(), 2, init="zeros")
    with pytest.raises(ValueError, match="scale"):
        LowRankLinear(8, 8, 2, scale=0.0)


def test_exported():
    assert optim.LowRankLinear is LowRankLinear and optim.to_low_rank is to_low_rank
    assert optim.lowrank.merge is merge


class RoutedBlock(nn.Module):
    """A block whose projections have no conventional names, with a mixture-of-experts router (``gate``)."""

    def __init__(self, d):
        super().__init__()
        self.wq, self.w1, self.w2 = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.gate = nn.Linear(d, 2)

    def forward(self, x):
        return x + self.wq(x) + self.w2(torch.relu(self.w1(x))) * torch.softmax(self.gate(x), -1)[..., :1]


def test_default_targets_are_every_linear_layer_of_the_blocks_whatever_its_name():
    # Only the listed names were factored, silently leaving OPT's and BART's out_proj, BERT's dense layers and
    # every projection of GPT-NeoX/Falcon/T5 dense. A transformer's blocks are an nn.ModuleList: every linear layer
    # inside one is a target; a router, a head outside the blocks and a list whose elements are the layers are not.
    model = nn.ModuleDict(dict(blocks=nn.ModuleList(RoutedBlock(6) for _ in range(2)),
                               heads=nn.ModuleList(nn.Linear(6, 3) for _ in range(2)),
                               classifier=nn.ModuleDict(dict(out_proj=nn.Linear(6, 6)))))
    assert [name for name, _ in find_targets(model)] == [f"blocks.{i}.{leaf}" for i in range(2)
                                                         for leaf in ("wq", "w1", "w2")]


def test_layers_whose_parent_reads_their_weight_are_left_dense():
    # nn.MultiheadAttention passes out_proj.weight to F.multi_head_attention_forward and TransformerEncoderLayer's
    # eval fast path reads linear1.weight: factored, their forwards raised AttributeError. The default leaves them
    # out (the error says why nothing is left); a target that names one is refused, the model unchanged.
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 2).eval()
    with pytest.raises(ValueError, match="parents read their weight: MultiheadAttention, TransformerEncoderLayer"):
        to_low_rank(encoder, 3)
    with pytest.raises(ValueError, match=r"'layers.0.self_attn.out_proj', whose parent \(MultiheadAttention\) reads "
                                         r"self.out_proj.weight"):
        to_low_rank(encoder, 3, target=["linear1", "out_proj"])
    assert not any(isinstance(m, LowRankLinear) for m in encoder.modules())
    assert encoder(torch.randn(2, 5, 16)).shape == (2, 5, 16)


class _ScaledLinear(nn.Linear):
    """A linear layer with its own forward: ``2 · (x Wᵀ + b)``."""

    def forward(self, x):
        return 2.0 * super().forward(x)


class _Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(_ScaledLinear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                                                  nn.Linear(8, 8)) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_linear_layers_that_compute_something_else_are_left_dense():
    # An nn.Linear subclass with its own forward (a scaled or quantized layer) and a parametrized weight
    # (orthogonal, weight_norm) were factored like plain layers: the scale, the parametrization, silently gone.
    torch.manual_seed(0)
    model = _Blocks()
    torch.nn.utils.parametrizations.orthogonal(model.layers[0][2])
    x = torch.randn(3, 8)
    expected = model(x)
    assert [name for name, _ in find_targets(model)] == ["layers.0.4", "layers.1.2", "layers.1.4"]
    for target, why in ((["layers.0.0"], r"a _ScaledLinear whose forward is its own"),
                        (["layers.0.2"], r"whose weight is parametrized \(torch.nn.utils.parametrize\)")):
        with pytest.raises(ValueError, match=rf"'{target[0]}', {why}; .*Narrow target"):
            to_low_rank(model, 4, target=target)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    to_low_rank(model, 4)
    assert type(model.layers[0][0]) is _ScaledLinear and type(model.layers[1][0]) is _ScaledLinear
    assert torch.nn.utils.parametrize.is_parametrized(model.layers[0][2], "weight")
    assert all(isinstance(model.layers[i][j], LowRankLinear) for i, j in ((0, 4), (1, 2), (1, 4)))


def test_conversion_and_merge_keep_a_frozen_layer_frozen():
    # to_low_rank and merge built every new layer trainable: a frozen layer (fine-tuning the others) became one
    model = nn.Sequential(nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))]))
    model[0][0][0].weight.requires_grad_(False)
    to_low_rank(model, 2)
    first = model[0][0][0]
    assert not first.B.requires_grad and not first.A.requires_grad and first.bias.requires_grad
    frozen, half, trained = model[0][0]
    for p in frozen.parameters():
        p.requires_grad_(False)
    half.A.requires_grad_(False)
    merge(model)
    assert [(name, p.requires_grad) for name, p in model.named_parameters()] == [
        ("0.0.0.weight", False), ("0.0.0.bias", False), ("0.0.1.weight", True), ("0.0.1.bias", True),
        ("0.0.2.weight", True), ("0.0.2.bias", True)]


def test_tied_linear_layers_are_left_dense():
    # Two linear layers holding one weight (a decoder tied to an encoder, layers shared across blocks) were each
    # factored on its own: two independent pairs of factors, the tie silently gone. A module reused in several
    # places is one layer, and is factored once.
    torch.manual_seed(0)
    first, second, third = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
    second.weight = first.weight
    model = nn.Sequential(nn.ModuleList([nn.Sequential(first, nn.Tanh(), second, third, nn.Tanh(), third)]))
    model.forward = lambda x: model[0][0](x)
    assert [name for name, _ in find_targets(model)] == ["0.0.3"]
    with pytest.raises(ValueError, match=r"'0.0.0', whose weight is also the weight of '0.0.2' \(tied layers\)"):
        to_low_rank(model, 2, target=["0.0.*"])
    assert model[0][0][2] is second and second.weight is first.weight
    to_low_rank(model, 2)
    block = model[0][0]
    assert block[0] is first and block[2] is second and isinstance(block[3], LowRankLinear) and block[5] is block[3]
    x = torch.randn(4, 8)
    expected = model(x)
    optim.lowrank.merge(model)
    assert type(block[3]) is nn.Linear and block[5] is block[3]
    torch.testing.assert_close(model(x), expected)


def _hugging_face_model(name):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if name == "opt":
        return transformers.OPTForCausalLM(transformers.OPTConfig(
            vocab_size=40, hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=4,
            max_position_embeddings=32, word_embed_proj_dim=16))
    if name == "gpt_neox":
        return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
            vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
            max_position_embeddings=32))
    if name == "roberta":
        return transformers.RobertaForSequenceClassification(transformers.RobertaConfig(
            vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
            max_position_embeddings=40, num_labels=3))
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=40, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=4))


# the linear layers each model keeps dense: its head, and T5's wo, whose dtype T5's feed-forward reads
KEPT_DENSE = {"opt": {"lm_head"}, "gpt_neox": {"lm_head"}, "roberta": {"classifier.dense", "classifier.out_proj"},
              "t5": {"lm_head", "encoder.block.0.layer.1.DenseReluDense.wo",
                     "decoder.block.0.layer.2.DenseReluDense.wo"}}


@pytest.mark.parametrize("name", sorted(KEPT_DENSE))
def test_hugging_face_models_are_factored_in_every_block_and_merge_back(name):
    model = _hugging_face_model(name).double().eval()
    inputs = {"input_ids": torch.randint(3, 40, (2, 6))}
    if name == "t5":
        inputs["decoder_input_ids"] = torch.randint(3, 40, (2, 4))
    linear = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    to_low_rank(model, 2, init="svd")
    low_rank = {n for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert low_rank == linear - KEPT_DENSE[name]
    factored = model(**inputs).logits
    merge(model)
    torch.testing.assert_close(model(**inputs).logits, factored, rtol=1e-10, atol=1e-12)
