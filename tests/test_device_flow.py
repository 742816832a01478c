"""The Colab GPU path without a GPU: functions that take a model run where the model is (``model.device``).

A model whose weights are fake CUDA tensors (``FakeTensorMode``: shapes and devices, no data, no GPU needed, but a
CUDA build of torch) is handed to each function with the CPU tensors a chapter would pass. A CPU tensor meeting a
CUDA weight raises ``FakeTensorDeviceMismatchError``, which fails the test; a fake run ends at the first operation
that needs real data (``.item()``, ``bincount``), so each test also checks that the model received CUDA token ids
before that. Skipped with a CPU-only build of torch (CI); run it with a CUDA build:
``python -m pytest tests/test_device_flow.py`` in an environment with ``torch`` from the CUDA wheels.
"""

from __future__ import annotations

import pytest
import torch

from dsv3 import DeepSeekV3, ModelConfig
from dsv3.kernels.backend import use_backend

pytestmark = pytest.mark.skipif(
    torch.version.cuda is None, reason="fake CUDA tensors need a CUDA build of torch (no GPU needed)"
)

fake_tensor = pytest.importorskip("torch._subclasses.fake_tensor")
STOPS = (fake_tensor.DataDependentOutputException, fake_tensor.DynamicOutputShapeException)


@pytest.fixture
def fake_cuda():
    """(mode, model, seen): a tiny DeepSeekV3 whose parameters and buffers are fake CUDA tensors, and the devices
    of the token ids its forwards received."""
    mode = fake_tensor.FakeTensorMode(allow_non_fake_inputs=True)
    torch.manual_seed(0)
    model = DeepSeekV3(ModelConfig.tiny())
    with mode:
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None:
                    module._parameters[name] = torch.nn.Parameter(
                        mode.from_tensor(p).to("cuda"), requires_grad=p.requires_grad
                    )
            for name, b in list(module._buffers.items()):
                if b is not None:
                    module._buffers[name] = mode.from_tensor(b).to("cuda")
    model._check_inputs = lambda *args, **kwargs: None  # its int() of the ids would end the fake run at once
    seen = []  # the device of the token ids each forward of the model receives
    model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((args[0] if args else kwargs["input_ids"]).device.type), with_kwargs=True
    )
    assert model.device.type == "cuda"
    return mode, model, seen


def run(mode, fn):
    # the torch paths: fake tensors carry no data for a Triton kernel to read (the device logic is the same)
    with use_backend("torch"), mode:
        try:
            fn()
        except STOPS:
            pass  # the fake run needed real data: everything before ran with consistent devices


def test_cpu_input_to_a_cuda_model_is_caught(fake_cuda):
    """The harness itself: what the chapters did before (CPU ids into the trained CUDA model) fails here."""
    mode, model, seen = fake_cuda
    with pytest.raises(fake_tensor.FakeTensorDeviceMismatchError):
        run(mode, lambda: model(torch.randint(0, 2048, (1, 8))))


def test_domain_expert_loads(fake_cuda):
    from dsv3.data import load_corpus
    from dsv3.viz.moe import domain_expert_loads

    mode, model, seen = fake_cuda
    corpus = load_corpus(domains=("shakespeare",))
    run(mode, lambda: domain_expert_loads(model, corpus, batch_size=1, seq_len=8, max_batches=1))
    assert seen == ["cuda"]


def test_sentence_routing(fake_cuda):
    from dsv3.data import load_tokenizer
    from dsv3.viz.moe import sentence_routing

    mode, model, seen = fake_cuda
    run(mode, lambda: sentence_routing(model, load_tokenizer(), "To be, or not to be"))
    assert seen == ["cuda"]


def test_balance_gradients(fake_cuda):
    from dsv3.viz.balance import balance_gradients

    mode, model, seen = fake_cuda
    ids = torch.randint(0, 2048, (2, 8))
    run(mode, lambda: balance_gradients(model, ids, ids, aux_alpha=0.01, seq_alpha=1e-4))
    assert seen == ["cuda"]


def test_capture_mla(fake_cuda):
    from dsv3.viz.mla import capture_mla

    mode, model, seen = fake_cuda
    run(mode, lambda: capture_mla(model, torch.randint(0, 2048, (1, 8))))
    assert seen == ["cuda"]


def test_mtp_probes(fake_cuda):
    from dsv3.viz.mtp import dependence, gradient_norms

    mode, model, seen = fake_cuda
    ids = torch.randint(0, 2048, (1, 8))
    run(mode, lambda: dependence(model, ids[0]))
    run(mode, lambda: gradient_norms(model, ids, ids))
    assert seen and set(seen) == {"cuda"}


def test_exact_first_tokens(fake_cuda):
    from dsv3.viz.speculative import exact_first_tokens

    mode, model, seen = fake_cuda
    run(mode, lambda: exact_first_tokens(model, [5, 6, 7], top_k=2))
    assert seen and set(seen) == {"cuda"}
