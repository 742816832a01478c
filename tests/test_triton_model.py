"""The whole model on the Triton kernels (run by Triton's interpreter on the CPU) against the torch path:
same logits, same gradients, same greedy tokens. Every layer calls dsv3.kernels, so this covers the wiring."""

import pytest
import torch

from dsv3 import kernels
from helpers import random_model, small_config

pytest.importorskip("triton")
if not kernels.interpret_mode():
    pytest.skip("needs TRITON_INTERPRET=1 set before triton is imported", allow_module_level=True)


def run(model, ids, labels, backend):
    model.zero_grad(set_to_none=True)
    with kernels.use_backend(backend):
        out = model(ids, labels=labels)
        out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def greedy(model, ids, steps, backend):
    with kernels.use_backend(backend), torch.no_grad():
        cache = model.new_cache(ids.shape[0], ids.shape[1] + steps)
        logits = model(ids, cache=cache).logits[:, -1]
        tokens = []
        for _ in range(steps):
            nxt = logits.argmax(-1, keepdim=True)  # (B, 1)
            tokens.append(nxt)
            logits = model(nxt, cache=cache).logits[:, -1]
    return torch.cat(tokens, dim=1)


@pytest.mark.slow
def test_triton_backend_matches_torch_logits_grads_and_tokens():
    cfg = small_config(vocab_size=128, num_hidden_layers=2, max_position_embeddings=64)
    model = random_model(cfg, seed=3).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    labels = torch.randint(0, cfg.vocab_size, (2, 12))
    ref_logits, ref_loss, ref_grads = run(model, ids, labels, "torch")
    tri_logits, tri_loss, tri_grads = run(model, ids, labels, "triton")
    assert torch.allclose(tri_logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert torch.allclose(tri_loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert ref_grads.keys() == tri_grads.keys()
    for name, g in ref_grads.items():
        assert torch.allclose(tri_grads[name], g, rtol=1e-3, atol=1e-5), name
    model.eval()
    assert torch.equal(greedy(model, ids[:, :6], 4, "triton"), greedy(model, ids[:, :6], 4, "torch"))


def test_ragged_batch_keeps_the_fused_decode_kernel(monkeypatch):
    """A left-padded batch decodes through the Triton kernel with per-row start offsets (it no longer falls back
    to torch for good): the tokens equal the torch path's and each row's own unpadded run."""
    from dsv3.generate import generate
    from dsv3.kernels import mla as kernels_mla

    cfg = small_config(vocab_size=128, num_hidden_layers=2, max_position_embeddings=64)
    model = random_model(cfg, seed=4)
    prompts = [torch.randint(0, cfg.vocab_size, (n,)) for n in (3, 7)]
    calls = []
    triton_decode = kernels_mla.mla_decode_triton

    def spy(q, q_rope, ckv, krope, seq_lens, scale, block_table=None, starts=None, num_splits=None):
        calls.append(starts)
        return triton_decode(q, q_rope, ckv, krope, seq_lens, scale, block_table, starts, num_splits)

    monkeypatch.setattr(kernels_mla, "mla_decode_triton", spy)
    with kernels.use_backend("triton"):
        fused = generate(model, prompts, 4).tokens
    assert len(calls) == 4 * cfg.num_hidden_layers  # prefill + 3 decode steps, every layer on the kernel
    assert all(s is not None and s.tolist() == [4, 0] for s in calls)
    with kernels.use_backend("torch"):
        assert torch.equal(fused, generate(model, prompts, 4).tokens)
        for row, p in zip(fused, prompts):
            assert torch.equal(row, generate(model, p, 4).tokens[0])
