"""GPU memory of `extemb train` for a Llama and an embedder of L layers, by arithmetic (docs/training.md):
the frozen LLM in bf16, the trained layers in fp32 with their gradients, AdamW's two moments and the
moving average, autocast's bf16 copies of the trained weights, and the activations the backward pass
keeps, with and without gradient checkpointing, at each sample length; then the longest sample that
fits, by memory and by the LLM's trained positions.

    .venv/bin/python scripts/memory_plan.py                              # Llama-2-7B, 8 layers, 80 GB
    .venv/bin/python scripts/memory_plan.py --measure --model extemb-llama2   # check against autograd

What the backward pass keeps, per position and decoder layer, bf16 (the two-stream pass on CUDA:
masked SDPA for the raw rows, trainer.py): the layer input, the normed input, q, k, v, the attention
output and o_proj's input, the MLP's input and normed input (9 x hidden), and gate, silu(gate), up and
their product (4 x intermediate); the raw rows' attention also keeps the compact slots' keys and
values repeated for every row (two_stream.py), 2 x rows x slots x kv-width. With checkpointing each
layer keeps only its input (hidden), plus one layer's full set while it is recomputed.
`--measure` counts what autograd saves (saved-tensor hooks) on a real checkpoint on this CPU and
sets it beside the same arithmetic at that model's sizes.
"""

from __future__ import annotations

import argparse
import math

GB = 1e9
LLAMA2_7B = dict(hidden=4096, intermediate=11008, layers=32, kv_width=4096, vocab=32000, positions=4096)


def params_per_layer(hidden: int, intermediate: int, kv_width: int) -> int:
    return 2 * hidden * hidden + 2 * hidden * kv_width + 3 * hidden * intermediate + 2 * hidden


def llm_params(m: dict) -> int:
    return m["layers"] * params_per_layer(m["hidden"], m["intermediate"], m["kv_width"]) + m["vocab"] * m["hidden"] \
        + m["hidden"] + m["vocab"] * m["hidden"]  # untied LM head (Llama-2)


def static_bytes(m: dict, embedder_layers: int) -> dict:
    p = embedder_layers * params_per_layer(m["hidden"], m["intermediate"], m["kv_width"])
    return {"frozen LLM, bf16": 2 * llm_params(m), "embedder weights, fp32": 4 * p, "their gradients, fp32": 4 * p,
            "AdamW moments, fp32": 8 * p, "moving average, fp32": 4 * p, "autocast's bf16 weight copies": 2 * p}


def layer_bytes(m: dict, positions: int, rows: int, slots: int) -> float:
    """One decoder layer's saved activations, bf16: every position, and the slots repeated per row."""
    per_position = 2 * (9 * m["hidden"] + 4 * m["intermediate"])
    return positions * per_position + 2 * 2 * rows * slots * m["kv_width"]


def activation_bytes(m: dict, embedder_layers: int, tokens: int, k: int, chunk: int = 512,
                     checkpoint: bool = False) -> dict:
    n = tokens // chunk
    rows, slots = n - 1, (n - 1) * math.ceil(chunk / k)
    positions = rows * chunk + slots  # raw rows (chunks 1..) and compact slots (chunks ..n-2)
    enc = (n - 1) * chunk  # tokens the embedder encodes (every chunk but the last)
    llm_layer = layer_bytes(m, positions, rows, slots)
    emb_layer = layer_bytes(m, enc, 0, 0)
    if checkpoint:  # each layer's input kept, one layer's full set while it is recomputed
        llm = m["layers"] * 2 * positions * m["hidden"] + llm_layer
        emb = embedder_layers * 2 * enc * m["hidden"] + emb_layer
    else:
        llm, emb = m["layers"] * llm_layer, embedder_layers * emb_layer
    return {"frozen LLM": llm, "embedder": emb}


def longest(m: dict, embedder_layers: int, k: int, budget: float, chunk: int = 512) -> tuple[int, int, int]:
    """(by memory, by the LLM's positions, the smaller) in tokens, with checkpointing, at this k."""
    n = 2
    while sum(activation_bytes(m, embedder_layers, (n + 1) * chunk, k, chunk, True).values()) <= budget:
        n += 1
    by_memory = n * chunk
    by_positions = ((m["positions"] - chunk) // math.ceil(chunk / k) + 1) * chunk  # last row's positions fit
    return by_memory, by_positions, min(by_memory, by_positions)


def plan(m: dict, embedder_layers: int, gpu_gb: float, slack_gb: float):
    static = static_bytes(m, embedder_layers)
    print(f"static ({embedder_layers}-layer embedder of {llm_params(m) / 1e9:.2f}B-parameter Llama)")
    for name, b in static.items():
        print(f"  {name:32s} {b / GB:7.2f} GB")
    total_static = sum(static.values())
    print(f"  {'sum':32s} {total_static / GB:7.2f} GB   (+ {slack_gb:g} GB CUDA context, allocator slack, loss blocks)")
    print("\nactivations kept for the backward pass, k=4 (the ladder's most slots); total against "
          f"{gpu_gb:g} GB")
    for tokens in (4096, 8192):
        for ckpt in (False, True):
            act = activation_bytes(m, embedder_layers, tokens, 4, checkpoint=ckpt)
            total = total_static + sum(act.values()) + slack_gb * GB
            print(f"  {tokens:5d} tokens, checkpointing {'on ' if ckpt else 'off'}: "
                  f"LLM {act['frozen LLM'] / GB:6.2f} GB, embedder {act['embedder'] / GB:5.2f} GB -> {total / GB:6.1f} GB "
                  f"{'fits' if total <= gpu_gb * GB else 'does not fit'}")
    budget = gpu_gb * GB - total_static - slack_gb * GB
    print("\nlongest sample with checkpointing (tokens): by memory / by the LLM's "
          f"{m['positions']} positions / both")
    for k in (4, 8, 16, 32):
        mem, pos, both = longest(m, embedder_layers, k, budget)
        print(f"  k={k:2d}: {mem:6d} / {pos:6d} / {both:6d}")


def measure(model_dir: str, tokens: int):
    """Saved activations of one bf16 two-stream pass (masked SDPA path, as on CUDA) on this CPU, by autograd's
    saved-tensor hooks, beside the arithmetic at this model's sizes."""
    import torch

    from extemb_vllm.model.checkpoint import load_model
    from extemb_vllm.train import two_stream

    two_stream.slot_attention_available = lambda device: False  # the CUDA path's attention
    model, _ = load_model(model_dir, dtype=torch.bfloat16)
    model.embedder.float().train()
    cfg = model.llm.config
    m = dict(hidden=cfg.hidden_size, intermediate=cfg.intermediate_size, layers=cfg.num_hidden_layers,
             kv_width=cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads))
    layers = len(model.embedder.body.layers)
    ids = torch.randint(100, cfg.vocab_size - 100, (tokens,))
    for ckpt in (False, True):
        seen = {}

        def pack(t, seen=seen):
            if t.numel() * t.element_size() > 0:
                seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
            loss = two_stream.two_stream_forward(model, ids, 4, 512, checkpoint=ckpt)
        loss.backward()
        model.embedder.zero_grad(set_to_none=True)
        weights = sum(p.numel() * 2 for p in model.embedder.parameters())  # autocast's bf16 copies, counted here
        act = activation_bytes(m, layers, tokens, 4, checkpoint=False)
        predicted = act["frozen LLM"] + (act["embedder"] if not ckpt else 0)
        if ckpt:  # the trainer checkpoints the embedder too; here only the LLM's layers are
            predicted = activation_bytes(m, layers, tokens, 4, checkpoint=True)["frozen LLM"] + act["embedder"]
        print(f"{tokens} tokens, LLM checkpointing {'on ' if ckpt else 'off'}: measured "
              f"{(sum(seen.values()) - weights) / GB:.3f} GB saved (less {weights / GB:.3f} GB of bf16 weight copies),"
              f" arithmetic {predicted / GB:.3f} GB")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--embedder-layers", type=int, default=8)
    ap.add_argument("--gpu-gb", type=float, default=80)
    ap.add_argument("--slack-gb", type=float, default=2, help="CUDA context, allocator fragmentation, loss blocks")
    ap.add_argument("--measure", action="store_true", help="check the arithmetic against autograd on --model")
    ap.add_argument("--model", default="extemb-llama2")
    ap.add_argument("--tokens", type=int, default=4096)
    args = ap.parse_args()
    if args.measure:
        measure(args.model, args.tokens)
    else:
        plan(LLAMA2_7B, args.embedder_layers, args.gpu_gb, args.slack_gb)


if __name__ == "__main__":
    main()
