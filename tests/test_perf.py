"""Exactness of the performance paths against the plain ones they replace: the fused linear cross-entropy
(chatglm3.model.fused_loss) against F.cross_entropy over full float32 logits, alone and in the model on real tiny-model
batches (packed rows included); per-conversation attention (chatglm3.model.packed_attention) against the dense
block-diagonal mask; oneDNN's matmul (chatglm3.model.onednn) against aten's. Speed itself is measured by
benchmarks/bench_train.py, not here."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _common  # noqa: E402  (the data pipeline, as the benchmarks run it)

from chatglm3 import ChatGLMForConditionalGeneration, ChatGLMTokenizer  # noqa: E402

from chatglm3.model import fused_loss, onednn  # noqa: E402
from chatglm3.model.fused_loss import linear_cross_entropy, row_block_size  # noqa: E402
from chatglm3.model.modeling import build_attention_mask  # noqa: E402
from chatglm3.model.packed_attention import Segments, segment_attention  # noqa: E402
from preprocess_utils import DataCollatorForChatGLM, DataCollatorForPacking, build_dataset, pack_samples  # noqa: E402


def reference(hidden, weight, targets):
    return F.cross_entropy(F.linear(hidden, weight).float(), targets)


def loss_and_grads(loss_fn, hidden, weight, targets):
    hidden = hidden.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(True)
    loss = loss_fn(hidden, weight, targets)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("row_block", [7, 64, 0])  # 0 = the device's default block (one block here)
def test_fused_equals_cross_entropy_fp32(row_block):
    torch.manual_seed(0)
    hidden, weight = torch.randn(300, 48), torch.randn(1000, 48) * 0.3
    targets = torch.randint(0, 1000, (300,))
    expected = loss_and_grads(reference, hidden, weight, targets)
    got = loss_and_grads(lambda h, w, y: linear_cross_entropy(h, w, y, row_block=row_block), hidden, weight, targets)
    for name, e, g in zip(("loss", "hidden grad", "weight grad"), expected, got):
        assert g.dtype == e.dtype, name
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=name)


def test_fused_frozen_weight_no_grad_and_empty():
    torch.manual_seed(1)
    hidden, weight, targets = torch.randn(50, 16), torch.randn(200, 16), torch.randint(0, 200, (50,))
    h = hidden.clone().requires_grad_(True)
    linear_cross_entropy(h, weight, targets, row_block=16).backward()  # frozen weight (P-Tuning): only the hidden grad
    h_ref = hidden.clone().requires_grad_(True)
    reference(h_ref, weight, targets).backward()
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, row_block=7), reference(hidden, weight, targets))
    # Twice the scale of the loss, twice the gradient: the backward scales what the forward computed.
    h2 = hidden.clone().requires_grad_(True)
    (2 * linear_cross_entropy(h2, weight, targets)).backward()
    torch.testing.assert_close(h2.grad, 2 * h_ref.grad, rtol=1e-5, atol=1e-6)
    empty = torch.zeros(0, 16, requires_grad=True)
    loss = linear_cross_entropy(empty, weight.requires_grad_(True), targets[:0])
    loss.backward()
    assert loss.item() == 0 and empty.grad.shape == (0, 16) and weight.grad.abs().sum() == 0


def test_fused_bf16_matches_autograd_in_bf16():
    torch.manual_seed(2)
    hidden = torch.randn(120, 32).bfloat16()
    weight = (torch.randn(500, 32) * 0.2).bfloat16()
    targets = torch.randint(0, 500, (120,))
    expected = loss_and_grads(reference, hidden, weight, targets)
    got = loss_and_grads(lambda h, w, y: linear_cross_entropy(h, w, y, row_block=32), hidden, weight, targets)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.bfloat16
    for name, e, g in zip(("loss", "hidden grad", "weight grad"), expected, got):
        torch.testing.assert_close(g.float(), e.float(), rtol=2e-2, atol=2e-3, msg=name)


def test_row_block_bounds_the_logits():
    cpu = torch.device("cpu")
    assert row_block_size(65024, cpu) * 65024 * 4 <= 128 * 2**20 and row_block_size(65024, cpu) % 8 == 0
    assert row_block_size(10**9, cpu) == 8  # never zero rows


# --- packed attention --------------------------------------------------------------------------------------------
def packed_mask(lengths_per_row, width):
    rows = []
    for lengths in lengths_per_row:
        row = [segment for segment, n in enumerate(lengths, start=1) for _ in range(n)]
        rows.append(row + [0] * (width - len(row)))
    return torch.tensor(rows)


def test_segments_from_mask():
    mask = packed_mask([[3, 2, 4], [5]], 10)
    assert Segments.from_mask(mask).spans == [[(0, 3), (3, 5), (5, 9)], [(0, 5)]]
    assert Segments.from_mask(torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])) is None  # nothing packed: the plain path


@pytest.mark.parametrize("prefix_len", [0, 3])
def test_segment_attention_equals_block_diagonal_mask(prefix_len):
    torch.manual_seed(3)
    mask = packed_mask([[5, 1, 7], [9, 4], [2]], 16)
    b, heads, s, d = 3, 2, 16, 8
    q = torch.randn(b, heads, s, d, requires_grad=True)
    k = torch.randn(b, heads, prefix_len + s, d, requires_grad=True)
    v = torch.randn(b, heads, prefix_len + s, d, requires_grad=True)
    real = (mask > 0)[:, None, :, None]
    weights = torch.randn(b, heads, s, d) * real  # a loss that reads the real positions only

    def run(attend):
        for t in (q, k, v):
            t.grad = None
        out = attend()
        (out * weights).sum().backward()
        return out.detach() * real, q.grad.clone(), k.grad.clone(), v.grad.clone()

    dense_mask = build_attention_mask(mask, s, 0, prefix_len, "cpu")
    dense = run(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask))
    segments = run(lambda: segment_attention(q, k, v, Segments.from_mask(mask), prefix_len))
    for name, e, g in zip(("output", "q grad", "k grad", "v grad"), dense, segments):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6, msg=name)


# --- in the model, on real tiny-model batches ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_batches(tiny_model, tmp_path_factory):
    """A dynamic-padding batch and a batch of packed rows of the Pokémon conversations, tokenized for the tiny model."""
    tokenizer = ChatGLMTokenizer.from_pretrained(str(tiny_model))
    items = build_dataset(_common.pokemon_conversations(tmp_path_factory.mktemp("pokemon")), tokenizer, max_seq_length=256, verbose=False).items
    packed = DataCollatorForPacking(tokenizer)(pack_samples(items[:12], 512))
    assert int(packed["attention_mask"].max()) > 2  # rows really hold several conversations
    return {"dynamic": DataCollatorForChatGLM(tokenizer)(items[:5]), "packed": packed}


def upstream_style_loss(model, batch):
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], return_logits=True).logits.float()
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)


@pytest.mark.parametrize("kind", ["dynamic", "packed"])
def test_model_loss_equals_full_logits_cross_entropy(tiny_model, tiny_batches, kind, monkeypatch):
    # Full fine-tuning, so that the gradient of every weight (the output layer's and, through the hidden states,
    # every layer's) is compared; 16-row blocks, so that the batch spans many.
    batch = tiny_batches[kind]
    model = ChatGLMForConditionalGeneration.from_pretrained(str(tiny_model)).train()
    model.config.hidden_dropout = 0.0
    monkeypatch.setitem(fused_loss._BLOCK_BYTES, "cpu", 16 * 4 * model.config.padded_vocab_size)
    assert fused_loss.fusable(model.transformer.output_layer)

    def loss_and_grads(compute):
        model.zero_grad()
        loss = compute()
        loss.backward()
        return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}

    expected, expected_grads = loss_and_grads(lambda: upstream_style_loss(model, batch))
    got, grads = loss_and_grads(lambda: model(**batch).loss)
    assert abs(got - expected) < 1e-5
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_fusable_only_for_a_plain_output_layer():
    assert fused_loss.fusable(torch.nn.Linear(4, 10, bias=False))
    assert not fused_loss.fusable(torch.nn.Linear(4, 10))  # a bias it would skip
    assert not fused_loss.fusable(torch.nn.Sequential(torch.nn.Linear(4, 10, bias=False)))  # a wrapper (adapter)


# --- oneDNN matmul ----------------------------------------------------------------------------------------------------
def test_onednn_matmul_equals_aten_and_keeps_out_of_autocast():
    torch.manual_seed(4)
    a, b = torch.randn(70, 48), torch.randn(90, 48)
    assert onednn.usable(a, b)
    torch.testing.assert_close(onednn.matmul_nt(a, b), a @ b.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(onednn.matmul_nt(a, b.T.contiguous().T), a @ b.T, rtol=1e-5, atol=1e-5)  # a transposed view
    assert not onednn.usable(a.bfloat16(), b.bfloat16())  # other dtypes: aten
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not onednn.usable(a, b) and onednn.matmul_nt(a, b).dtype == torch.bfloat16  # autocast keeps its casts
