"""PerSampleStats on the layers of a standard transformer, against the naive per-sample loop
in float64 (every statistic): nn.MultiheadAttention, nn.TransformerEncoderLayer /
DecoderLayer, F.scaled_dot_product_attention, embeddings shared by the samples (positions),
tied embeddings, RMSNorm, Hugging Face GPT-2 and BERT from config; params= / exclude=; the
errors that replace a number that would be wrong."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adabatch.batching.estimators import PerSampleStats, PerSampleTuning
from adabatch.batching.persample.estimator import rule_for
from adabatch.batching.persample.layers import TransposedLinearRule
from tests.batching.test_estimators import DT, NEEDS, batch, check

V, E, T = 11, 8, 6  # vocabulary, width, sequence length


def tokens(b=5, seed=1, vocab=V, length=T):
    x, y = batch(b, (length,), 3, seed=seed, ints=vocab)
    x[:, 0] = 1  # no sample all padding (index 0)
    return x, y


# --- nn.MultiheadAttention -------------------------------------------------------------------
class MHAModel(nn.Module):
    """Tokens and shared positions, one attention layer, a linear head; ``masks``: None,
    "causal" (a 2-D bool mask with a key padding mask) or "3d" (a float mask per sample and
    head), ``cross``: keys and values of other widths (separate projection weights, bias_kv)."""

    def __init__(self, batch_first, need_weights, masks=None, cross=False):
        super().__init__()
        self.emb = nn.Embedding(V, E)
        self.pos = nn.Embedding(T, E)
        kw = {"kdim": 6, "vdim": 4, "add_bias_kv": True} if cross else {}
        self.att = nn.MultiheadAttention(E, 2, batch_first=batch_first, **kw)
        self.kv = nn.Linear(E, 6) if cross else None
        self.v = nn.Linear(E, 4) if cross else None
        self.head = nn.Linear(E, 3)
        self.bf, self.nw, self.masks = batch_first, need_weights, masks
        self.mask3 = torch.randn(2, T, T + int(cross), dtype=DT)  # per head; times the sample

    def forward(self, t):
        h = self.emb(t) + self.pos(torch.arange(t.shape[1]))
        k, v = (self.kv(h), self.v(h)) if self.kv is not None else (h, h)
        kw = {}
        if self.masks == "causal":
            kw["attn_mask"] = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
            kw["key_padding_mask"] = t == 0
        elif self.masks == "3d":  # [b * heads, T, S], different for every sample
            kw["attn_mask"] = (self.mask3 * t[:, :1, None, None].to(DT)).reshape(-1, T, T)
        if not self.bf:
            h, k, v = (z.transpose(0, 1) for z in (h, k, v))
        o, w = self.att(h, k, v, need_weights=self.nw, **kw)
        if not self.bf:
            o = o.transpose(0, 1)
        out = self.head(o).mean(1)
        if w is not None:
            out = out + 0.1 * w.pow(2).sum((1, 2))[:, None]
        return out


@pytest.mark.parametrize("masks", [None, "causal", "3d"])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention(batch_first, need_weights, masks):
    torch.manual_seed(0)
    check(MHAModel(batch_first, need_weights, masks).to(DT), [tokens()])


@pytest.mark.parametrize("needs", NEEDS)
def test_multihead_attention_cross_and_every_subset_of_statistics(needs):
    torch.manual_seed(1)
    model = MHAModel(False, True, cross=True).to(DT)
    check(model, [tokens(seed=2)], needs)


@pytest.mark.parametrize("chunking", [{"chunk_size": 2}, {"budget": 300}])
def test_chunks_of_samples(chunking):
    torch.manual_seed(18)
    check(MHAModel(False, True, "3d").to(DT), [tokens(seed=18)], **chunking)
    check(Stack(False, True, True).to(DT), [tokens(seed=19)], **chunking)
    check(TinyGPT(raw=True).to(DT), [lm_batch(b=5)], loss_fn=lm_loss, **chunking)


def test_multihead_attention_micro_batches():
    torch.manual_seed(2)
    x, y = tokens(b=7, seed=3)
    check(MHAModel(False, True, "causal").to(DT), [(x[:3], y[:3]), (x[3:], y[3:])])


# --- nn.TransformerEncoderLayer / DecoderLayer -----------------------------------------------
class Stack(nn.Module):
    def __init__(self, batch_first, norm_first, decoder, dropout=0.0):
        super().__init__()
        self.emb = nn.Embedding(V, E)
        layer = nn.TransformerDecoderLayer if decoder else nn.TransformerEncoderLayer
        self.blocks = nn.ModuleList(
            layer(E, 2, 16, dropout=dropout, batch_first=batch_first, norm_first=norm_first)
            for _ in range(2))
        self.head = nn.Linear(E, 3)
        self.bf, self.decoder = batch_first, decoder

    def forward(self, t):
        h = self.emb(t)
        if not self.bf:
            h = h.transpose(0, 1)
        mask = nn.Transformer.generate_square_subsequent_mask(t.shape[1], dtype=DT)
        memory = h
        for block in self.blocks:
            if self.decoder:
                h = block(h, memory, tgt_mask=mask, tgt_key_padding_mask=t == 0)
            else:
                h = block(h, src_mask=mask, src_key_padding_mask=t == 0)
        if not self.bf:
            h = h.transpose(0, 1)
        return self.head(h).mean(1)


@pytest.mark.parametrize("decoder", [False, True])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_layers(batch_first, norm_first, decoder):
    torch.manual_seed(3)
    check(Stack(batch_first, norm_first, decoder).to(DT), [tokens(seed=4)])


class Whole(nn.Module):
    """nn.TransformerEncoder / TransformerDecoder (with a final LayerNorm) or nn.Transformer."""

    def __init__(self, kind, batch_first):
        super().__init__()
        self.emb = nn.Embedding(V, E)
        if kind == "encoder":
            layer = nn.TransformerEncoderLayer(E, 2, 16, 0.0, batch_first=batch_first)
            self.net = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(E),
                                             enable_nested_tensor=False)
        elif kind == "decoder":
            layer = nn.TransformerDecoderLayer(E, 2, 16, 0.0, batch_first=batch_first)
            self.net = nn.TransformerDecoder(layer, 2, norm=nn.LayerNorm(E))
        else:
            self.net = nn.Transformer(E, 2, 1, 1, 16, 0.0, batch_first=batch_first)
        self.head = nn.Linear(E, 3)
        self.kind, self.bf = kind, batch_first

    def forward(self, t):
        h = self.emb(t)
        if not self.bf:
            h = h.transpose(0, 1)
        mask = nn.Transformer.generate_square_subsequent_mask(t.shape[1], dtype=DT)
        if self.kind == "encoder":
            h = self.net(h, mask=mask, src_key_padding_mask=t == 0)
        elif self.kind == "decoder":
            h = self.net(h, h, tgt_mask=mask, tgt_key_padding_mask=t == 0)
        else:
            h = self.net(h, h, tgt_mask=mask, src_key_padding_mask=t == 0,
                         memory_key_padding_mask=t == 0)
        if not self.bf:
            h = h.transpose(0, 1)
        return self.head(h).mean(1)


@pytest.mark.parametrize("kind", ["encoder", "decoder", "transformer"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_stacks(kind, batch_first):
    torch.manual_seed(16)
    check(Whole(kind, batch_first).to(DT), [tokens(seed=16)])


def test_encoder_in_eval_mode_with_dropout_configured():
    torch.manual_seed(4)
    model = Stack(False, False, False, dropout=0.3).to(DT).eval()
    check(model, [tokens(seed=5)])


def test_active_dropout_in_a_recomputed_layer_raises():
    model = Stack(False, False, False, dropout=0.3).to(DT)
    est = PerSampleStats(model)
    x, y = tokens()
    msg = r"layer 'blocks\.0' .* its dropout \(self_attn\) is active"
    with pytest.raises(ValueError, match=msg):
        with est.measure():
            F.cross_entropy(model(x), y).backward()


class RandomOrMixing(nn.Module):
    """A raw parameter (the torch.func path) with a random or batch-mixing forward."""

    def __init__(self, kind):
        super().__init__()
        self.w = nn.Parameter(torch.randn(E, dtype=DT))
        self.kind = kind

    def forward(self, x):
        h = x * self.w
        return F.dropout(h, 0.5) if self.kind == "random" else h - h.mean(0)


@pytest.mark.parametrize("kind", ["random", "mixing"])
def test_recomputation_that_differs_from_the_pass_raises(kind):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, E), RandomOrMixing(kind), nn.Linear(E, 3)).to(DT)
    est = PerSampleStats(model)
    x, y = batch(6, (4,), 3)
    with pytest.raises(ValueError, match=r"layer '1' .* does not give the same output"):
        with est.measure():
            F.cross_entropy(model(x), y).backward()


# --- scaled_dot_product_attention, RMSNorm, tied embeddings, shared positions ----------------
class SDPABlock(nn.Module):
    """Pre-norm causal self-attention with RMSNorm; ``raw``: the projections as raw
    parameters of the block (the torch.func path), else Linear layers."""

    def __init__(self, raw):
        super().__init__()
        self.norm = nn.RMSNorm(E)
        self.raw = raw
        if raw:
            self.qkv = nn.Parameter(torch.randn(3 * E, E, dtype=DT) / E ** 0.5)
        else:
            self.qkv_lin = nn.Linear(E, 3 * E)
        self.out = nn.Linear(E, E, bias=False)

    def forward(self, x):
        h = self.norm(x)
        qkv = F.linear(h, self.qkv) if self.raw else self.qkv_lin(h)
        q, k, v = (z.unflatten(-1, (2, E // 2)).transpose(1, 2) for z in qkv.chunk(3, -1))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.out(a.transpose(1, 2).flatten(2))


class TinyGPT(nn.Module):
    """Token and position embeddings (``positions``: how the shared indices look), blocks,
    RMSNorm, and an output layer tied to the token embedding."""

    def __init__(self, raw=False, positions="arange", pos_first=False):
        super().__init__()
        self.tok = nn.Embedding(V, E)
        self.pos = nn.Embedding(T, E)
        self.blocks = nn.Sequential(SDPABlock(raw), SDPABlock(False))
        self.norm = nn.RMSNorm(E)
        self.lm = nn.Linear(E, V, bias=False)
        self.lm.weight = self.tok.weight
        self.positions, self.pos_first = positions, pos_first

    def forward(self, t):
        idx = torch.arange(t.shape[1])
        if self.positions == "row":
            idx = idx[None]
        if self.positions == "scalar":
            p = self.pos(torch.tensor(2))  # one position for every token: ambiguous
        else:
            p = self.pos(idx)
        h = p + self.tok(t) if self.pos_first else self.tok(t) + p
        return self.lm(self.norm(self.blocks(h)))


def lm_loss(out, y):
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


def lm_batch(b=4, seed=6, vocab=V, length=T):
    x, _ = tokens(b, seed, vocab, length)
    return x, torch.roll(x, -1, 1)


@pytest.mark.parametrize(("raw", "positions", "pos_first"), [
    (False, "arange", False), (True, "arange", True), (False, "row", True)])
def test_sdpa_rmsnorm_tied_embeddings_shared_positions(raw, positions, pos_first):
    torch.manual_seed(6)
    check(TinyGPT(raw, positions, pos_first).to(DT), [lm_batch()], loss_fn=lm_loss)


@pytest.mark.parametrize("needs", NEEDS)
def test_shared_positions_every_subset_of_statistics_and_micro_batches(needs):
    torch.manual_seed(7)
    x, y = lm_batch(b=7)
    check(TinyGPT().to(DT), [(x[:2], y[:2]), (x[2:], y[2:])], needs, loss_fn=lm_loss)


def test_shared_positions_with_a_given_batch_size():
    torch.manual_seed(8)
    model = TinyGPT(pos_first=True).to(DT)
    x, y = lm_batch()
    est = PerSampleStats(model, needs={"variance_trace"})
    with est.measure(batch_size=4):
        lm_loss(model(x), y).backward()
    ref = PerSampleStats(model, needs={"variance_trace"})
    model.zero_grad()
    with ref.measure():
        lm_loss(model(x), y).backward()
    assert est.stats().variance_trace == pytest.approx(ref.stats().variance_trace, rel=1e-12)


def test_positions_as_many_as_samples_are_ambiguous():
    model = TinyGPT(pos_first=True).to(DT)
    x, y = lm_batch(b=T)  # arange(T) has as many indices as the batch has samples
    est = PerSampleStats(model)
    with pytest.raises(ValueError, match=r"layer 'pos' got the indices 0\.\.5, as many as"):
        with est.measure():
            model(x)
    model.positions = "row"  # [1, T]: shared, unambiguous
    check(model, [(x, y)], loss_fn=lm_loss)
    model.positions = "scalar"
    with pytest.raises(ValueError, match=r"layer 'pos' got one index without a dimension"):
        with est.measure():
            model(x)
    # no per-sample work: nothing is ambiguous, the layer runs as it is
    model.positions = "arange"
    est = PerSampleStats(model, needs={"grad_sq_norm"})
    model.zero_grad()
    with est.measure():
        lm_loss(model(x), y).backward()
    g = torch.cat([p.grad.reshape(-1) for p in est.params])
    assert est.stats().grad_sq_norm == pytest.approx(float(g @ g), rel=1e-12)


class ViT(nn.Module):
    """A class token and positions as raw parameters of the model (``torch.cat``, ``+``):
    the model itself goes through the torch.func path for them."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(1, E, 2, stride=2)
        self.cls = nn.Parameter(torch.randn(1, 1, E, dtype=DT))
        self.pos = nn.Parameter(torch.randn(1, 5, E, dtype=DT))
        self.block = nn.TransformerEncoderLayer(E, 2, 16, 0.0, batch_first=True, norm_first=True)
        self.head = nn.Linear(E, 3)

    def forward(self, x):
        h = self.patch(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], 1) + self.pos
        return self.head(self.block(h)[:, 0])


def test_class_token_and_positions_as_raw_parameters():
    torch.manual_seed(17)
    check(ViT().to(DT), [batch(5, (1, 4, 4), 3, seed=17)])


# --- Hugging Face transformers, from config (no download) ------------------------------------
class HF(nn.Module):
    """Logits of a transformers model from token ids (with an attention mask for BERT)."""

    def __init__(self, model, mask):
        super().__init__()
        self.model, self.mask = model, mask

    def forward(self, t):
        kw = {"attention_mask": (t != 0).long()} if self.mask else {}
        return self.model(input_ids=t, **kw).logits


@pytest.mark.parametrize("needs", NEEDS)
def test_huggingface_gpt2_tied_lm_head(needs):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(9)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50, n_positions=16,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0)
    gpt = transformers.GPT2LMHeadModel(cfg).to(DT)
    assert gpt.lm_head.weight is gpt.transformer.wte.weight
    check(HF(gpt, False), [lm_batch(vocab=50, length=6)], needs, loss_fn=lm_loss)
    # Conv1D (a transposed Linear) has its own rule, not the torch.func path
    rule = rule_for(gpt.transformer.h[0].attn.c_attn, ("weight", "bias"), PerSampleTuning())
    assert isinstance(rule, TransposedLinearRule)


def test_huggingface_gpt2_with_dropout_needs_no_recomputation():
    # every GPT-2 layer has a rule (Conv1D, Embedding, LayerNorm, Linear): its dropout,
    # outside them, is seen in their inputs and output gradients, and nothing raises
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(20)
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    model = HF(transformers.GPT2LMHeadModel(cfg).to(DT).train(), False)
    est = PerSampleStats(model)
    x, y = lm_batch(vocab=50, length=6)
    with est.measure():
        lm_loss(model(x), y).backward()
    s = est.stats()
    assert s.variance_trace > 0 and s.ip_variance >= 0


@pytest.mark.parametrize("needs", NEEDS)
def test_huggingface_conv1d_on_flat_inputs(needs):
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(15)
    model = nn.Sequential(Conv1D(12, 5), nn.Tanh(), Conv1D(3, 12)).to(DT)
    check(model, [batch(7, (5,), 3, seed=15)], needs)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_huggingface_bert_sequence_classification(impl):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(10)
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, num_labels=3,
                                  attn_implementation=impl)
    bert = transformers.BertForSequenceClassification(cfg).to(DT)
    x, y = tokens(seed=11, vocab=40, length=6)
    x[1:, -2:] = 0  # padding, masked out
    check(HF(bert, True), [(x, y)])


# --- params= / exclude= ----------------------------------------------------------------------
class Functional(nn.Module):
    """A parameter used outside a module call (cannot be attributed to samples)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.w = nn.Linear(4, 3)  # its weight is only used through F.linear

    def forward(self, x):
        return F.linear(torch.tanh(self.lin(x)), self.w.weight)


@pytest.mark.parametrize("how", ["name", "module", "parameter", "params"])
def test_exclude_a_parameter_used_outside_a_module_call(how):
    torch.manual_seed(12)
    model = Functional().to(DT)
    kw = {"name": {"exclude": ["w"]}, "module": {"exclude": model.w},
          "parameter": {"exclude": [model.w.weight, "w.bias"]},
          "params": {"params": list(model.lin.parameters())}}[how]
    est, _ = check(model, [batch(6, (4,), 3, seed=12)], **kw)
    assert est.params == [model.lin.weight, model.lin.bias]


@pytest.mark.parametrize("needs", NEEDS)
def test_subset_of_a_transformer(needs):
    torch.manual_seed(13)
    model = TinyGPT().to(DT)
    est, _ = check(model, [lm_batch()], needs, loss_fn=lm_loss,
                   exclude=["blocks.0.qkv_lin", "tok", model.norm])
    names = {n for n, p in model.named_parameters() if any(p is q for q in est.params)}
    assert names == {"pos.weight", "blocks.0.norm.weight", "blocks.0.out.weight",
                     "blocks.1.norm.weight", "blocks.1.qkv_lin.weight", "blocks.1.qkv_lin.bias",
                     "blocks.1.out.weight"}
    est, _ = check(model, [lm_batch()], needs, loss_fn=lm_loss,
                   params=["blocks.1", model.pos.weight], exclude="blocks.1.norm")
    assert len(est.params) == 4


def test_subset_of_multihead_attention():
    torch.manual_seed(14)
    model = MHAModel(False, True).to(DT)
    est, _ = check(model, [tokens()], exclude=["att.in_proj_weight", "att.out_proj.bias"])
    assert not any(p is model.att.in_proj_weight for p in est.params)
    est, _ = check(model, [tokens()], params=[model.att.out_proj.weight])
    assert est.params == [model.att.out_proj.weight]


def test_params_and_exclude_validation():
    model = Functional()
    with pytest.raises(ValueError, match=r"Invalid exclude: the model has no parameter or module "
                                         r"named 'nope'"):
        PerSampleStats(model, exclude=["nope"])
    with pytest.raises(ValueError, match=r"Invalid params: a tensor of shape \(2,\) that is not"):
        PerSampleStats(model, params=[torch.zeros(2)])
    with pytest.raises(ValueError, match=r"Invalid exclude: Linear is not a module of the model"):
        PerSampleStats(model, exclude=nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"Invalid params: int \(must be a parameter"):
        PerSampleStats(model, params=[3])
    with pytest.raises(ValueError, match=r"no parameters that require gradients \(among those"):
        PerSampleStats(model, exclude=[model])
