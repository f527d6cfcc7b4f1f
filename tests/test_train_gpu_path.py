"""The trainer's GPU path, covered on a machine without a GPU (issue 28): the choices made by device,
and the frozen LLM's gradient checkpointing giving the plain pass's loss and embedder gradients."""

import pytest
import torch

from extemb_vllm.train.config import TrainConfig
from extemb_vllm.train.step import compute_plan
from extemb_vllm.train.two_stream import two_stream_forward


def test_the_code_path_is_chosen_by_device():
    cfg = TrainConfig(model="", data=[], out="")
    gpu = compute_plan(cfg, torch.device("cuda", 0))
    assert (gpu.bf16, gpu.checkpoint, gpu.attention) == (True, True, "sdpa-masked")
    cpu = compute_plan(cfg, torch.device("cpu"))
    assert (cpu.bf16, cpu.checkpoint, cpu.attention) == (False, False, "cpu-slot-kernel")
    forced = compute_plan(TrainConfig(model="", data=[], out="", bf16=True, grad_ckpt=True), torch.device("cpu"))
    assert (forced.bf16, forced.checkpoint) == (True, True)
    off = compute_plan(TrainConfig(model="", data=[], out="", bf16=False, grad_ckpt=False), torch.device("cuda"))
    assert (off.bf16, off.checkpoint) == (False, False)


@pytest.mark.parametrize("kernel", [True, False], ids=["cpu-slot-kernel", "sdpa-masked"])
@pytest.mark.parametrize("row_len", [None, 5])
def test_checkpointed_llm_layers_give_the_plain_loss_and_embedder_gradients(tiny_checkpoint, monkeypatch, kernel,
                                                                           row_len):
    """The frozen LLM's layers recomputed in the backward pass (the GPU path) against the plain pass,
    with each attention path the trainer may take (the masked SDPA one is what CUDA runs)."""
    from extemb_vllm.model.checkpoint import load_model
    from extemb_vllm.train import two_stream

    monkeypatch.setattr(two_stream, "slot_attention_available", lambda device: kernel)
    model, _ = load_model(tiny_checkpoint)
    model.embedder.train()
    ids = torch.randint(3, 300, (5 * 16,))
    weight = torch.rand(ids.numel()) + 0.5
    results = []
    for checkpoint in (False, True):
        model.embedder.zero_grad()
        loss = two_stream_forward(model, ids, 4, 16, row_len=row_len, token_weight=weight, checkpoint=checkpoint)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.embedder.named_parameters()}))
    (loss_plain, grads_plain), (loss_ckpt, grads_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss_plain)
    for name, g in grads_plain.items():
        assert g.abs().sum() > 0, name  # the input gradient reaches every embedder layer
        torch.testing.assert_close(grads_ckpt[name], g, atol=1e-5, rtol=1e-4)


def test_checkpointing_keeps_less_for_the_backward_pass(tiny_checkpoint, monkeypatch):
    """What the autograd graph holds between forward and backward, measured with saved-tensor hooks:
    with the LLM's layers checkpointed, a fraction of the plain pass's."""
    from extemb_vllm.model.checkpoint import load_model
    from extemb_vllm.train import two_stream

    monkeypatch.setattr(two_stream, "slot_attention_available", lambda device: False)
    model, _ = load_model(tiny_checkpoint)
    model.embedder.train()
    ids = torch.randint(3, 300, (8 * 16,))
    saved = {}
    for checkpoint in (False, True):
        seen = {}

        def pack(t, seen=seen):
            seen[(t.data_ptr(), t.shape, t.dtype)] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = two_stream_forward(model, ids, 2, 16, checkpoint=checkpoint)
        saved[checkpoint] = sum(seen.values())
        loss.backward()
    assert saved[True] < 0.5 * saved[False], saved
