"""Curvature of Hugging Face architectures as their users build them: ``attn_implementation="sdpa"``, a collator's
``{"input_ids", "attention_mask", "labels"}`` batch, the model's logits into the criterion.

The oracle is torch's own double backward of the same model with SDPA on its math backend (twice differentiable).
Not the model's eager twin: Hugging Face's eager attention takes its softmax in float32 and its RMSNorm upcasts to
float32, so a float64 model differs from its twin by 1e-8 and from finite differences by 1e-4, whoever computes.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import optim
from optim.hessian import attention as attention_module
from optim.hessian import causal_lm_loss

transformers = pytest.importorskip("transformers")

VOCAB = 40
_DECODERS = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                 max_position_embeddings=32)
_ENCODERS = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                 max_position_embeddings=40, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
ARCHITECTURES = {
    # grouped-query attention, rotary positions, RMSNorm
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(_DECODERS, num_key_value_heads=2)),
    # a sliding window shorter than the sequence: a banded causal mask
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(_DECODERS, num_key_value_heads=2, sliding_window=3)),
    # rotary on half of each head, parallel attention and MLP
    "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", dict(_DECODERS, rotary_pct=0.5)),
    # learned positions, a ReLU MLP
    "opt": ("OPTForCausalLM", "OPTConfig", dict(vocab_size=VOCAB, hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                                                num_attention_heads=4, max_position_embeddings=32,
                                                word_embed_proj_dim=16, dropout=0.0)),
    # one key-value head for all queries
    "gemma": ("GemmaForCausalLM", "GemmaConfig", dict(_DECODERS, num_key_value_heads=1, head_dim=4)),
    # ALiBi position biases (data, not learned) and a GeLU written as an old-style autograd.Function
    "bloom": ("BloomForCausalLM", "BloomConfig", dict(vocab_size=VOCAB, hidden_size=16, n_layer=1, n_head=4,
                                                      attn_implementation="eager")),  # it has no SDPA path
    # bidirectional attention with a padding mask
    "bert": ("BertForSequenceClassification", "BertConfig", _ENCODERS),
    "vit": ("ViTForImageClassification", "ViTConfig",
            dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4, image_size=8,
                 patch_size=4, num_channels=3, num_labels=3, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0)),
}


def _model(name: str) -> torch.nn.Module:
    model_class, config_class, config = ARCHITECTURES[name]
    config_class = getattr(transformers, config_class, None)
    if config_class is None:
        pytest.skip(f"this transformers has no {ARCHITECTURES[name][1]}")
    torch.manual_seed(0)
    config = {"attn_implementation": "sdpa", **config}
    return getattr(transformers, model_class)(config_class(**config)).double().eval()


def _batch(name: str, rows: int = 3, length: int = 7) -> tuple[dict, object]:
    """A collator's batch for the model (row 0 right-padded) and the criterion its logits go to."""
    if name == "vit":
        return {"pixel_values": torch.randn(rows, 3, 8, 8, dtype=torch.float64),
                "labels": torch.randint(0, 3, (rows,))}, F.cross_entropy
    input_ids = torch.randint(3, VOCAB, (rows, length))
    mask = torch.ones_like(input_ids)
    mask[0, length - 2:] = 0
    if name == "bert":
        return {"input_ids": input_ids, "attention_mask": mask, "labels": torch.randint(0, 3, (rows,))}, F.cross_entropy
    labels = input_ids.masked_fill(mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}, causal_lm_loss


def _math_double_backward(model, loss, v: torch.Tensor) -> torch.Tensor:
    """``H v`` by torch's double backward of ``loss(*params)``, SDPA on its math backend; ``v`` flat."""
    params = [p for p in model.parameters() if p.requires_grad]
    with sdpa_kernel([SDPBackend.MATH]):
        grads = torch.autograd.grad(loss(), params, create_graph=True, allow_unused=True)
        pieces = torch.split(v, [p.numel() for p in params])
        dot = sum((g * piece.view_as(g)).sum() for g, piece in zip(grads, pieces) if g is not None)
        products = torch.autograd.grad(dot, params, allow_unused=True)
    return torch.cat([(h if h is not None else torch.zeros_like(p)).reshape(-1) for h, p in zip(products, params)])


def _count_composite(monkeypatch) -> list:
    """Record each call of the T×T composite attention (a learned bias takes it; a data mask must not)."""
    calls = []
    composite = attention_module.composite_attention
    monkeypatch.setattr(attention_module, "composite_attention",
                        lambda *args, **kwargs: calls.append(1) or composite(*args, **kwargs))
    return calls


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_the_hessian_of_a_hugging_face_sdpa_model_is_torchs_math_double_backward(name, monkeypatch):
    model = _model(name)
    batch, criterion = _batch(name)
    H = optim.HessianOperator(model, criterion, batch)
    v = torch.randn(H.n, dtype=torch.float64)
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    expected = _math_double_backward(model, lambda: criterion(model(**inputs).logits, batch["labels"]), v)
    composite = _count_composite(monkeypatch)
    torch.testing.assert_close(H @ v, expected, rtol=1e-10, atol=1e-12)
    assert not composite  # the padding and causal masks are data: the O(T) ops, never the T×T composite
    fisher = optim.EmpiricalFisherOperator(model, criterion, batch)  # per-sample gradients, however they can go
    rows = []
    for i in range(batch["labels"].shape[0]):
        one = {key: value[i:i + 1] for key, value in batch.items()}
        loss = lambda one=one: criterion(model(**{k: t for k, t in one.items() if k != "labels"}).logits,
                                         one["labels"])
        params = [p for p in model.parameters() if p.requires_grad]
        with sdpa_kernel([SDPBackend.MATH]):
            grads = torch.autograd.grad(loss(), params, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                               for g, p in zip(grads, params)]))
    G = torch.stack(rows)
    torch.testing.assert_close(fisher @ v, G.T @ (G @ v) / G.shape[0], rtol=1e-7, atol=1e-12)


def _encoder_decoder(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "t5":
        config = transformers.T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                       num_decoder_layers=1, num_heads=4, dropout_rate=0.0,
                                       decoder_start_token_id=0, pad_token_id=0)
        return transformers.T5ForConditionalGeneration(config).double().eval()
    if name == "whisper":  # no prepare_decoder_input_ids_from_labels: its forward shifts the labels itself
        config = transformers.WhisperConfig(vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1,
                                            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=32,
                                            decoder_ffn_dim=32, num_mel_bins=7, max_source_positions=8,
                                            max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                            decoder_start_token_id=1, suppress_tokens=None,
                                            begin_suppress_tokens=None, attn_implementation="sdpa")
        return transformers.WhisperForConditionalGeneration(config).double().eval()
    config = transformers.BartConfig(vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=32,
                                     decoder_ffn_dim=32, max_position_embeddings=32, dropout=0.0,
                                     attention_dropout=0.0, attn_implementation="sdpa")
    return transformers.BartForConditionalGeneration(config).double().eval()


def _sequence_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


@pytest.mark.parametrize("name", ["t5", "bart", "whisper"])
def test_an_encoder_decoder_batch_of_labels_gets_the_decoder_inputs_the_model_would_build(name, monkeypatch):
    # model(**batch) of a seq2seq collator's batch (no decoder_input_ids) shifts the labels right itself; the
    # operators call the model without the labels, and raised the model's "specify input_ids" error until they
    # built the decoder inputs the same way.
    model = _encoder_decoder(name)
    input_ids = torch.randint(3, VOCAB, (3, 7))
    labels = torch.randint(3, VOCAB, (3, 5))
    labels[0, 3:] = -100
    if name == "whisper":  # log-mel features (batch, mel bins, frames): twice the source positions
        encoder_inputs = {"input_features": torch.randn(3, 7, 16, dtype=torch.float64)}
    else:
        encoder_inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    batch = {**encoder_inputs, "labels": labels}
    H = optim.HessianOperator(model, _sequence_loss, batch)
    v = torch.randn(2, H.n, dtype=torch.float64)
    expected = torch.stack([_math_double_backward(model, lambda: model(**batch).loss, row) for row in v])
    composite = _count_composite(monkeypatch)
    torch.testing.assert_close(H @ v, expected, rtol=1e-10, atol=1e-12)
    assert bool(composite) == (name == "t5")  # T5's relative position bias is learned: its derivatives are needed
    if name == "whisper":
        from transformers.models.whisper.modeling_whisper import shift_tokens_right

        shifted = shift_tokens_right(labels, model.config.pad_token_id, model.config.decoder_start_token_id)
    else:
        shifted = model.prepare_decoder_input_ids_from_labels(labels=labels)
    decoder_inputs = {**encoder_inputs, "decoder_input_ids": shifted}
    for operator_class in (optim.GGNOperator, optim.EmpiricalFisherOperator):
        ours = operator_class(model, _sequence_loss, batch)
        explicit = operator_class(model, _sequence_loss, (decoder_inputs, labels))
        torch.testing.assert_close(ours @ v, explicit @ v, rtol=1e-10, atol=1e-12)


def _mixtral_with_router_loss() -> torch.nn.Module:
    if not hasattr(transformers, "MixtralConfig"):
        pytest.skip("this transformers has no MixtralConfig")
    torch.manual_seed(0)
    config = transformers.MixtralConfig(**_DECODERS, num_key_value_heads=2, num_local_experts=3,
                                        num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.5,
                                        attn_implementation="sdpa", experts_implementation="eager")
    return transformers.MixtralForCausalLM(config).double().eval()


@pytest.mark.parametrize("name", sorted(ARCHITECTURES) + ["mixtral"])
def test_model_loss_measures_the_loss_the_model_returns(name):
    # model(**batch).loss is what a Trainer optimizes: for a mixture of experts with output_router_logits it adds
    # the router's load-balancing term, which no criterion of the logits has.
    model = _mixtral_with_router_loss() if name == "mixtral" else _model(name)
    batch, criterion = _batch("llama" if name == "mixtral" else name)
    H = optim.HessianOperator(model, optim.hessian.model_loss, batch)
    v = torch.randn(2, H.n, dtype=torch.float64)
    expected = torch.stack([_math_double_backward(model, lambda: model(**batch).loss, row) for row in v])
    torch.testing.assert_close(H @ v, expected, rtol=1e-9, atol=1e-12)
    of_logits = optim.HessianOperator(model, criterion, batch) @ v
    if name == "mixtral":
        assert not torch.allclose(of_logits, expected, rtol=1e-3)
    fisher = optim.EmpiricalFisherOperator(model, optim.hessian.model_loss, batch)
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(batch["labels"].shape[0]):
        with sdpa_kernel([SDPBackend.MATH]):
            grads = torch.autograd.grad(model(**{key: t[i:i + 1] for key, t in batch.items()}).loss, params,
                                        allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                               for g, p in zip(grads, params)]))
    G = torch.stack(rows)
    torch.testing.assert_close(fisher @ v, (v @ G.T) @ G / G.shape[0], rtol=1e-7, atol=1e-12)
    record = optim.SharpnessMonitor(model, optim.hessian.model_loss, every=1, lr_from=0.1, probes=2).step(0, batch)
    assert record["lambda_max"] > 0 and record["trace"] == record["trace"]


def test_model_loss_is_refused_where_it_cannot_serve():
    model = _model("llama")
    batch, _ = _batch("llama")
    for make in (lambda: optim.GGNOperator(model, optim.hessian.model_loss, batch),
                 lambda: optim.SharpnessMonitor(model, optim.hessian.model_loss, curvature="ggn")):
        with pytest.raises(ValueError, match="not a function of its outputs, which the Gauss-Newton matrix needs"):
            make()
    for optimizer, hessian in (("SophiaH", "ggn"), ("AdaHessian", "ggn-fd")):
        with pytest.raises(ValueError, match="not a function of its outputs, which the Gauss-Newton curvature needs"):
            getattr(optim, optimizer)(model.parameters(), hessian=hessian, loss_fn=optim.hessian.model_loss)
    with pytest.raises(ValueError, match="the compiled Fisher product needs.*or compile=False"):
        optim.EmpiricalFisherOperator(model, optim.hessian.model_loss, batch, compile=True)
    plain = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="Linear.forward takes no labels: pass a criterion"):
        optim.HessianOperator(plain, optim.hessian.model_loss, (torch.randn(4, 3), torch.randn(4, 2)))
    without_labels = {key: value for key, value in batch.items() if key != "labels"}
    with pytest.raises(ValueError, match="has no scalar .loss"):
        optim.hessian.model_loss(model(**without_labels), None)


def test_a_hugging_face_model_under_autocast_has_the_curvature_torch_gives_there():
    # LLaMA's rotary positions leave its queries and keys float32 under autocast while the values are bfloat16;
    # torch's SDPA casts all three to bfloat16 there, the attention route refused them ("value is torch.bfloat16
    # but query is torch.float32"). And a graph kept outside the region served products inside it.
    model = _model("llama").float()
    batch, criterion = _batch("llama")
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    H = optim.HessianOperator(model, criterion, batch)
    v = torch.randn(H.n)
    outside = H @ v
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = H @ v
        fresh = optim.HessianOperator(model, criterion, batch) @ v
        expected = _math_double_backward(model, lambda: criterion(model(**inputs).logits, batch["labels"]), v)
    torch.testing.assert_close(inside, fresh, rtol=0, atol=0)
    assert (inside - expected).norm() <= 1e-2 * expected.norm()  # bfloat16 products, rounded apart
    assert (inside - outside).norm() <= 2e-2 * outside.norm() and not torch.equal(inside, outside)
    # the Fisher's kept G products came out bfloat16 there ("v[0] is torch.bfloat16 ... convert v")
    for operator_class in (optim.GGNOperator, optim.EmpiricalFisherOperator):
        for reuse_graph in (None, False):
            plain = operator_class(model, criterion, batch, reuse_graph=reuse_graph) @ v
            with torch.autocast("cpu", dtype=torch.bfloat16):
                mixed = operator_class(model, criterion, batch, reuse_graph=reuse_graph) @ v
            assert mixed.dtype == torch.float32 and (mixed - plain).norm() <= 2e-2 * plain.norm()


@pytest.mark.parametrize("name", ["t5", "bart", "whisper"])
def test_model_loss_of_an_encoder_decoder_is_its_own_loss(name):
    model = _encoder_decoder(name)
    input_ids = torch.randint(3, VOCAB, (3, 7))
    labels = torch.randint(3, VOCAB, (3, 5))
    labels[0, 3:] = -100
    if name == "whisper":
        encoder_inputs = {"input_features": torch.randn(3, 7, 16, dtype=torch.float64)}
    else:
        encoder_inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    batch = {**encoder_inputs, "labels": labels}
    H = optim.HessianOperator(model, optim.hessian.model_loss, batch)
    v = torch.randn(H.n, dtype=torch.float64)
    torch.testing.assert_close(H @ v, _math_double_backward(model, lambda: model(**batch).loss, v), rtol=1e-10,
                               atol=1e-12)
