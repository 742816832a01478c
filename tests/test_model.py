"""The model against transformers' DeepseekV3ForCausalLM (the numerical oracle), and its two MLA paths."""

import pytest
import torch
import transformers

from dsv3 import DeepSeekV3, save_pretrained
from helpers import random_model, rel_err, small_config

transformers.logging.set_verbosity_error()


def hf_twin(model, tmp_path):
    from transformers import DeepseekV3ForCausalLM

    save_pretrained(model, tmp_path)
    return DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # YaRN, query compression, groups, shared expert
        {"q_lora_rank": None, "n_shared_experts": 2, "n_routed_experts": 12, "num_experts_per_tok": 6, "topk_group": 3},
        {"rope_scaling": None, "first_k_dense_replace": 0, "n_group": 1, "topk_group": 1, "norm_topk_prob": False},
    ],
)
def test_logits_match_transformers(tmp_path, overrides):
    cfg = small_config(**overrides)
    model = random_model(cfg, seed=1)
    hf = hf_twin(model, tmp_path)
    ids = torch.randint(0, cfg.vocab_size, (2, 96))  # 96 > the original 32-token context: YaRN matters
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert rel_err(ours, theirs) < 1e-4


def test_mtp_matches_transformers_mtp_model(tmp_path):
    from transformers.modeling_layers import MtpModel

    cfg = small_config(num_nextn_predict_layers=2)
    model = random_model(cfg, seed=2)
    hf = hf_twin(model, tmp_path)
    L = cfg.num_hidden_layers
    hf._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{L + k}\..*" for k in range(2)]  # HF assumes 61 layers
    mtp = MtpModel.from_pretrained(hf).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    T = ids.shape[1]
    with torch.no_grad():
        out = model(ids, return_mtp=True)
        h = hf(ids, output_hidden_states=True).hidden_states[-1]
        pos = torch.arange(T).expand(2, T)
        for k in range(2):
            h = mtp.forward_layer(k, h[:, : T - k - 1], pos[:, : T - k - 1], None, input_ids=ids[:, k + 1 :])
            assert rel_err(out.mtp_logits[k], mtp._project_to_logits(h)) < 1e-4


def test_losses_and_mtp_alignment():
    """Depth k at position i predicts t_{i+k+1}: its loss equals a hand cross-entropy against labels[:, k:]."""
    cfg = small_config(num_nextn_predict_layers=2)
    model = random_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 33))
    ids, labels = tokens[:, :-1], tokens[:, 1:]
    out = model(ids, labels=labels, mtp_weight=0.3)
    T = ids.shape[1]
    assert [lg.shape[1] for lg in out.mtp_logits] == [T - 1, T - 2]
    for k, lg in enumerate(out.mtp_logits, 1):
        hand = torch.nn.functional.cross_entropy(lg.reshape(-1, cfg.vocab_size), tokens[:, k + 1 :].reshape(-1))
        assert torch.allclose(out.mtp_losses[k - 1], hand)
    main = torch.nn.functional.cross_entropy(out.logits.reshape(-1, cfg.vocab_size), labels.reshape(-1))
    assert torch.allclose(out.main_loss, main)
    assert torch.allclose(out.loss, main + 0.3 * (out.mtp_losses[0] + out.mtp_losses[1]) / 2)
    out.loss.backward()
    assert model.mtp[1].eh_proj.weight.grad.abs().sum() > 0
    assert all(layer.gate.e_score_correction_bias.grad is None for layer in model.moe_layers())


@pytest.mark.parametrize("chunk", [64, None])  # 64: five vocabulary chunks of 320; None: the automatic width
def test_fused_loss_matches_unfused_model(monkeypatch, chunk):
    """The fused loss (main head and every MTP depth through kernels.linear_cross_entropy, no (B, T, V) logits)
    gives the unfused model's losses and every gradient; the logits are then computed only when asked for."""
    import dsv3.model
    from dsv3 import kernels

    cfg = small_config(num_nextn_predict_layers=2)
    model = random_model(cfg).train()
    tokens = torch.randint(0, cfg.vocab_size, (2, 25))
    ids, labels = tokens[:, :-1], tokens[:, 1:].clone()
    labels[0, :5] = -100  # ignored positions, at the start (every MTP depth still sees them)

    def run():
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=labels, mtp_weight=0.3)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref, ref_grads = run()  # CPU, torch backend: F.cross_entropy over materialized logits
    assert ref._logits is not None
    calls = []

    def chunked(hidden, weight, lab, ignore_index=-100):
        calls.append(hidden.shape)
        return kernels.linear_cross_entropy_torch(hidden, weight, lab, ignore_index, chunk)

    monkeypatch.setattr(DeepSeekV3, "_fused_loss", lambda self, hidden, labels: True)
    monkeypatch.setattr(dsv3.model.kernels, "linear_cross_entropy_triton", chunked)  # the chunked reference
    fused, fused_grads = run()
    T, D = ids.shape[1], cfg.hidden_size
    assert calls == [(2 * T, D), (2 * (T - 1), D), (2 * (T - 2), D)]  # main head, then depths 1 and 2
    assert fused._logits is None and all(lg is None for lg in fused._mtp_logits)  # never materialized
    for a, b in [(fused.loss, ref.loss), (fused.main_loss, ref.main_loss), *zip(fused.mtp_losses, ref.mtp_losses)]:
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)
    assert fused_grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        assert torch.allclose(fused_grads[name], g, rtol=1e-4, atol=1e-7), name
    assert torch.equal(fused.logits, ref.logits)  # the same head on the same hidden state, computed on access
    assert all(torch.equal(a, b) for a, b in zip(fused.mtp_logits, ref.mtp_logits))


def test_ignore_index_is_ignored():
    cfg = small_config()
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 16))
    labels = torch.randint(0, cfg.vocab_size, (1, 16))
    masked = labels.clone()
    masked[:, 8:] = -100
    a = model(ids, labels=masked).main_loss
    b = torch.nn.functional.cross_entropy(model(ids).logits[0, :8], labels[0, :8])
    assert torch.allclose(a, b, atol=1e-6)


def test_absorbed_equals_naive_in_prefill():
    cfg = small_config()
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 50))
    with torch.no_grad():
        naive = model(ids).logits
        absorbed = model(ids, absorbed=True).logits
    assert rel_err(absorbed, naive) < 1e-5


@pytest.mark.parametrize("kind", ["latent", "naive"])
def test_cached_decode_equals_full_forward(kind):
    cfg = small_config()
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        full = model(ids).logits  # (B, T, V)
        cache = model.new_cache(batch_size=2, max_len=48, kind=kind)
        steps = [model(ids[:, :30], cache=cache).logits]
        steps.append(model(ids[:, 30:33], cache=cache).logits)  # a 3-token chunk (speculative verification)
        for t in range(33, 40):
            steps.append(model(ids[:, t : t + 1], cache=cache).logits)
    assert cache.length == 40
    assert rel_err(torch.cat(steps, dim=1), full) < 1e-5


def test_cache_truncate_rolls_back():
    cfg = small_config()
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 20))
    with torch.no_grad():
        cache = model.new_cache(1, 32)
        model(ids[:, :12], cache=cache)
        model(torch.randint(0, cfg.vocab_size, (1, 5)), cache=cache)  # drafted tokens, all rejected
        cache.truncate(12)
        rolled = model(ids[:, 12:], cache=cache).logits
        full = model(ids).logits[:, 12:]
    assert rel_err(rolled, full) < 1e-5


def test_left_padding_matches_unpadded():
    cfg = small_config()
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4), torch.ones(1, 12)], dim=1).long()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = model(ids).logits
        b = model(padded, attention_mask=mask, position_ids=pos).logits[:, 4:]
        c = model(padded, attention_mask=mask, position_ids=pos, absorbed=True).logits[:, 4:]
    assert rel_err(b, a) < 1e-5 and rel_err(c, a) < 1e-5


def test_ragged_batch_equals_per_row_runs_and_transformers(tmp_path):
    """Rows of 5, 12 and 9 tokens left-padded into one batch: prefill and cached decoding (naive and latent caches,
    and latent prefill without a cache) give each row what it gets alone, unpadded, and what transformers gives
    the padded batch at the real positions. The padding is per-row start offsets, kept by the cache."""
    cfg = small_config()
    model = random_model(cfg)
    hf = hf_twin(model, tmp_path)
    lens, extra = [5, 12, 9], 4
    rows = [torch.randint(0, cfg.vocab_size, (n + extra,)) for n in lens]
    P, B = max(lens), len(lens)
    ids = torch.zeros(B, P, dtype=torch.long)
    mask = torch.zeros(B, P, dtype=torch.long)
    for b, n in enumerate(lens):
        ids[b, P - n :], mask[b, P - n :] = rows[b][:n], 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        alone = [model(r[None]).logits[0] for r in rows]  # (n + extra, V) each
        theirs = hf(ids, attention_mask=mask, position_ids=pos).logits
        for b, n in enumerate(lens):
            assert rel_err(theirs[b, P - n :], alone[b][:n]) < 1e-4
        prefill = model(ids, attention_mask=mask, position_ids=pos, absorbed=True).logits
        for b, n in enumerate(lens):
            assert rel_err(prefill[b, P - n :], alone[b][:n]) < 1e-5
        for kind in ("latent", "naive"):
            cache = model.new_cache(B, P + extra, kind=kind)
            steps = [model(ids, attention_mask=mask, position_ids=pos, cache=cache).logits]
            assert cache.starts.tolist() == [P - n for n in lens] and cache.ragged
            for t in range(extra):
                nxt = torch.stack([rows[b][n + t] for b, n in enumerate(lens)])[:, None]  # (B, 1)
                steps.append(model(nxt, position_ids=pos[:, -1:] + t + 1, cache=cache).logits)
            out = torch.cat(steps, dim=1)  # (B, P + extra, V)
            for b, n in enumerate(lens):
                assert rel_err(out[b, P - n :], alone[b]) < 1e-5, kind


def test_padding_must_be_left_and_absorbed_must_agree_with_the_cache():
    cfg = small_config()
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 6))
    right = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="attention_mask row 0 is not left padding"):
        model(ids, attention_mask=right)
    with pytest.raises(ValueError, match="absorbed=False contradicts the 'latent' cache"):
        model(ids, cache=model.new_cache(2, 8), absorbed=False)


def test_routing_is_reported_and_never_drops_tokens():
    cfg = small_config()
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (3, 10))
    out = model(ids)
    assert out.expert_counts.shape == (cfg.num_moe_layers, cfg.n_routed_experts)
    assert (out.expert_counts.sum(-1) == 3 * 10 * cfg.num_experts_per_tok).all()
    for r in out.routing:
        groups = r.topk_ids // cfg.experts_per_group  # (N, K)
        assert all(len(set(g.tolist())) <= cfg.topk_group for g in groups)
        assert torch.allclose(r.topk_weights.sum(-1), torch.full((30,), cfg.routed_scaling_factor))


def test_bias_changes_selection_not_weights():
    cfg = small_config()
    model = random_model(cfg, bias_scale=0.0)
    x = torch.randn(20, cfg.hidden_size)
    gate = model.moe_layers()[0].gate
    w0, ids0, scores = gate(x)
    with torch.no_grad():
        gate.e_score_correction_bias[ids0[0, 0]] = -10.0  # never choose token 0's favourite again
    w1, ids1, _ = gate(x)
    assert ids0[0, 0] not in ids1[0]
    # the weights are the renormalized raw affinities of whatever was chosen; the bias never enters them
    expect = scores.gather(1, ids1)
    expect = expect / expect.sum(-1, keepdim=True) * cfg.routed_scaling_factor
    assert torch.allclose(w1, expect, atol=1e-6)


@pytest.mark.parametrize(
    "bad,message",
    [
        (lambda c: torch.tensor([[0, c.vocab_size]]), "token id 320, outside the vocabulary"),
        (lambda c: torch.tensor([[-1, 2]]), "token id -1"),
        (lambda c: torch.zeros(1, 0, dtype=torch.long), "input_ids is empty"),
        (lambda c: torch.zeros(1, c.max_position_embeddings + 1, dtype=torch.long), "exceeds max_position_embeddings"),
        (lambda c: torch.zeros(4, dtype=torch.long), "shape \\(batch, seq\\)"),
    ],
)
def test_bad_inputs(bad, message):
    cfg = small_config()
    model = random_model(cfg)
    with pytest.raises(ValueError, match=message):
        model(bad(cfg))


@pytest.mark.parametrize("bad_label", [-1, 320])
def test_bad_labels_are_named_once_at_the_boundary(bad_label):
    """forward checks labels against the vocabulary in the same read as the ids (-100 stays allowed)."""
    cfg = small_config()
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 8))
    labels = torch.full((1, 8), -100)
    labels[0, 3] = bad_label
    with pytest.raises(ValueError, match=f"labels holds token id {bad_label}, outside the vocabulary"):
        model(ids, labels=labels)
    labels[0, 3] = 5
    assert torch.isfinite(model(ids, labels=labels).loss)
