import math

import pytest
import torch

from bigscience_train.config import load_config, padded_vocab_size
from bigscience_train.model import output_chunks
from bigscience_train.model.gpt import GPT, build_on_meta, count_parameters, materialize
from bigscience_train.model.positions import alibi_causal_bias, alibi_slopes
from bigscience_train.model.shape import GPTShape
from bigscience_train.parallel.dims import ParallelDims
from bigscience_train.parallel.loss import masked_lm_loss_sum
from bigscience_train.parallel.pipeline import stage_layers

SHAPE = GPTShape(num_layers=2, hidden_size=64, num_heads=4, seq_length=32, vocab_size=256)


def tiny(position="alibi", **kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTShape(**{**SHAPE.__dict__, "position": position, **kw})).eval()


@pytest.mark.parametrize("heads", [1, 2, 4, 8, 16, 32])
def test_alibi_slopes_power_of_two_are_geometric(heads):
    expected = [2 ** (-8 * (i + 1) / heads) for i in range(heads)]
    assert alibi_slopes(heads).tolist() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("heads", [3, 6, 12, 20, 112])
def test_alibi_slopes_non_power_of_two_interleave_the_next_power(heads):
    closest = 2 ** math.floor(math.log2(heads))
    base = [2 ** (-8 * (i + 1) / closest) for i in range(closest)]
    extra = [2 ** (-8 * (i + 1) / (2 * closest)) for i in range(2 * closest)][0::2][: heads - closest]
    assert alibi_slopes(heads).tolist() == pytest.approx(base + extra, rel=1e-6)


@pytest.mark.parametrize("heads", [4, 6, 112])
def test_alibi_slopes_match_hugging_face_bloom(heads):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    mask = torch.ones(1, 3)
    hf = build_alibi_tensor(mask, heads, torch.float32)  # (heads, 1, seq): slope * position
    assert torch.allclose(hf[:, 0, 1], alibi_slopes(heads))


@pytest.mark.parametrize("position", ["alibi", "learned", "rotary"])
def test_shapes_and_causality(position):
    model = tiny(position)
    tokens = torch.randint(0, 256, (2, 16))
    logits = model(tokens)
    assert logits.shape == (2, 16, 256)
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 256
    after = model(changed)
    assert torch.equal(logits[:, :10], after[:, :10]), "future tokens changed past logits"
    assert not torch.allclose(logits[:, 10:], after[:, 10:])
    # Only some positions through the output layer: the same logits.
    at = torch.tensor([0, 7, 16 + 3, 31])
    torch.testing.assert_close(model(tokens, logits_at=at), logits.flatten(0, 1)[at])


@pytest.mark.parametrize("position", ["alibi", "rotary"])
def test_flex_attention_computes_what_sdpa_computes(position):
    """FlexAttention (ALiBi as a score modification, masked blocks skipped) against SDPA with its additive
    bias, the same weights, on a sequence that is not a multiple of the kernel's 128-token blocks. Forward
    only: torch has no CPU backward for FlexAttention (tests/test_cuda.py checks gradients on a GPU)."""
    sdpa, flex = tiny(position), tiny(position, attention="flex")
    flex.load_state_dict(sdpa.state_dict())
    tokens = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        assert torch.allclose(flex(tokens), sdpa(tokens), atol=1e-5, rtol=1e-5)


def test_alibi_attention_with_dropout_is_sdpa_with_the_dense_bias():
    """The mask the model builds for ALiBi is the dense causal bias: the same outputs and dropout draws."""
    import torch.nn.functional as F

    from bigscience_train.model.attention import causal_attention, causal_mask

    slopes = alibi_slopes(4)
    mask = causal_mask("sdpa", slopes, 40, torch.float32, torch.device("cpu"))
    qkv = torch.randn(2, 40, 4, 3, 16)
    torch.manual_seed(3)
    ours = causal_attention(qkv, mask, None, 0.3)
    torch.manual_seed(3)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(3))
    theirs = F.scaled_dot_product_attention(
        q, k, v, attn_mask=alibi_causal_bias(slopes, 40, torch.float32), dropout_p=0.3
    )
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("tie", [True, False])
def test_fused_output_loss_matches_logits_and_cross_entropy(tie, monkeypatch):
    # Chunks of 16 tokens over 2 x 32: four chunks, the loss mask cutting across them.
    monkeypatch.setattr(output_chunks, "MIN_CHUNK_TOKENS", 16)
    monkeypatch.setattr(output_chunks, "CHUNK_LOGITS", 16 * SHAPE.vocab_size)
    tokens = torch.randint(0, SHAPE.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    labels = tokens.roll(-1, dims=1)
    mask = torch.rand(2, 32, generator=torch.Generator().manual_seed(2)) > 0.25
    losses, grads = [], []
    for fused in (True, False):
        model = tiny(tie_embeddings=tie).train()
        if fused:
            loss_sum, count = model(tokens, labels=labels, loss_mask=mask)
        else:
            loss_sum, count = masked_lm_loss_sum(model(tokens), labels, mask)
        (loss_sum * 0.5).backward()
        losses.append((loss_sum.item(), count.item()))
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert losses[0][1] == losses[1][1] == mask.sum().item()
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-6)
    for name, grad in grads[1].items():
        torch.testing.assert_close(grads[0][name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_output_loss_without_gradients_and_under_autocast(dtype):
    model = tiny()
    tokens = torch.randint(0, SHAPE.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    labels, mask = tokens.roll(-1, dims=1), torch.ones(2, 32, dtype=torch.bool)
    with torch.no_grad():
        loss_sum, count = model(tokens, labels=labels, loss_mask=mask)
        expected, _ = masked_lm_loss_sum(model(tokens), labels, mask)
    assert not loss_sum.requires_grad and count.item() == 64
    assert loss_sum.item() == pytest.approx(expected.item(), rel=1e-6)
    # Half-precision matmuls, fp32 softmax (and fp32 gradients under fp16, which the loss scale has not yet
    # multiplied), fp32 gradients for the fp32 weights: as close as the unfused path is.
    model.train()
    with torch.autocast("cpu", dtype=dtype):
        loss_sum, _ = model(tokens, labels=labels, loss_mask=mask)
    loss_sum.backward()
    assert loss_sum.dtype == torch.float32
    assert loss_sum.item() == pytest.approx(expected.item(), rel=1e-2)
    assert model.lm_head.weight.grad.dtype == torch.float32


def test_fused_output_loss_backward_runs_once():
    model = tiny().train()
    tokens = torch.randint(0, SHAPE.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    loss_sum, _ = model(tokens, labels=tokens, loss_mask=torch.ones(2, 32))
    loss_sum.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward runs once"):
        loss_sum.backward()


def test_learned_positions_have_their_own_table():
    assert "transformer.position_embeddings.weight" in tiny("learned").state_dict()
    for position in ("alibi", "rotary"):
        assert "transformer.position_embeddings.weight" not in tiny(position).state_dict()


def test_names_and_logits_match_hugging_face_bloom():
    from transformers import BloomConfig, BloomForCausalLM

    model = tiny("alibi")
    hf = BloomForCausalLM(BloomConfig(vocab_size=256, hidden_size=64, n_layer=2, n_head=4)).eval()
    hf_keys = set(hf.state_dict())
    assert set(model.state_dict()) == hf_keys
    hf.load_state_dict(model.state_dict(), strict=True)
    tokens = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        assert torch.allclose(model(tokens), hf(tokens).logits, atol=1e-5)


def test_meta_construction_then_init_weights():
    shape = GPTShape(**{**SHAPE.__dict__, "num_layers": 8, "hidden_size": 256, "num_heads": 8})
    model = build_on_meta(shape)
    assert all(p.device.type == "meta" for p in model.parameters())
    materialize(model)
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    h = model.transformer.h["0"]
    assert h.mlp.dense_h_to_4h.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert h.mlp.dense_4h_to_h.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert h.self_attention.dense.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert torch.all(h.self_attention.query_key_value.bias == 0)
    assert torch.all(h.input_layernorm.weight == 1)
    assert torch.allclose(model.alibi_slopes, alibi_slopes(8))


def test_same_seed_same_weights_meta_or_not():
    eager = GPT(SHAPE, seed=3)
    meta = materialize(build_on_meta(SHAPE), seed=3)
    for (n, a), (_, b) in zip(eager.state_dict().items(), meta.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    other = GPT(SHAPE, seed=4)
    assert not torch.equal(other.lm_head.weight, eager.lm_head.weight)


def test_untied_output_layer():
    model = tiny(tie_embeddings=False)
    assert model.lm_head.weight is not model.transformer.word_embeddings.weight
    assert count_parameters(model) == count_parameters(tiny()) + 256 * 64


def test_vocab_padding_to_multiple_of_128_times_tp():
    assert padded_vocab_size(50257, 128, 1) == 50304
    assert padded_vocab_size(50257, 128, 4) == 50688
    assert padded_vocab_size(250880, 128, 4) == 250880
    cfg = load_config(["model=gpt_125m"])
    assert ParallelDims(tp=2).model_shape(cfg.model).vocab_size == 50432


def test_embedding_layernorm_switch():
    without = tiny(embedding_layernorm=False)
    assert not hasattr(without.transformer, "word_embeddings_layernorm")
    assert "transformer.word_embeddings_layernorm.weight" in tiny().state_dict()


@pytest.mark.parametrize(
    "layers, stages, count_embeddings, expected",
    [
        (4, 2, False, [(0, 2), (2, 4)]),
        (8, 4, False, [(0, 2), (2, 4), (4, 6), (6, 8)]),
        # BigScience's type:transformer|embedding: the ends carry the embedding and the output layer.
        (6, 4, True, [(0, 1), (1, 3), (3, 5), (5, 6)]),
        (70, 12, True, [(0, 5)] + [(5 + 6 * i, 11 + 6 * i) for i in range(10)] + [(65, 70)]),
    ],
)
def test_pipeline_stages_balance_layers(layers, stages, count_embeddings, expected):
    ranges = stage_layers(layers, stages, count_embeddings)
    assert [(r.start, r.stop) for r in ranges] == expected


@pytest.mark.parametrize("position", ["alibi", "learned", "rotary"])
def test_pipeline_stages_hold_the_whole_models_weights_and_compute_its_logits(position):
    """Each stage initialises only its own parameters, and gets the values the whole model has: the weights
    depend on the seed and the parameter's name alone. Run in sequence, the stages compute the same logits."""
    shape = GPTShape(**{**SHAPE.__dict__, "num_layers": 4, "position": position})
    whole = materialize(build_on_meta(shape), seed=7).eval()
    stages = [
        materialize(build_on_meta(shape).keep_layers(r), seed=7).eval() for r in stage_layers(4, 3, True)
    ]
    reference = whole.state_dict()
    for stage in stages:
        for name, tensor in stage.state_dict().items():
            assert torch.equal(tensor, reference[name]), name
    assert stages[-1].transformer.word_embeddings is None and stages[0].lm_head is None
    assert torch.equal(stages[-1].lm_head.weight, whole.transformer.word_embeddings.weight)
    tokens = torch.randint(0, SHAPE.vocab_size, (2, SHAPE.seq_length))
    x = tokens
    for stage in stages:
        x = stage(x)
    assert torch.allclose(x, whole(tokens), atol=1e-6)


def test_compiled_block_computes_what_the_eager_block_computes():
    """train.compile compiles each block in place: outputs and the gradients of the input and of every weight
    match the eager block's."""
    from bigscience_train.model.attention import causal_mask
    from bigscience_train.model.gpt import Block

    model = tiny()
    block = model.transformer.h["0"]
    compiled = Block(model.shape)
    compiled.load_state_dict(block.state_dict())
    compiled.compile(dynamic=False)
    mask = causal_mask("sdpa", model.alibi_slopes, SHAPE.seq_length, torch.float32, torch.device("cpu"))
    x = torch.randn(2, SHAPE.seq_length, SHAPE.hidden_size, requires_grad=True)
    grad = torch.randn_like(x)
    outputs = []
    for b in (block, compiled):
        y = b(x, mask, None)
        outputs.append((y, *torch.autograd.grad(y, (x, *b.parameters()), grad)))
    for eager, comp in zip(*outputs, strict=True):
        torch.testing.assert_close(comp, eager, atol=1e-5, rtol=1e-5)
