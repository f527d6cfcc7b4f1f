"""Where a training step's time goes: torch.profiler over a few steps of the two-stream objective,
grouped into matmuls, attention, the loss over the vocabulary, other element-wise work, and the rest.

    .venv/bin/python scripts/profile_train_step.py --sample-len 4096 --k 16 --bf16
    PYTHONPATH=/path/to/older/checkout .venv/bin/python scripts/profile_train_step.py ...  # another version

It imports `extemb_vllm` from wherever Python finds it, so the same script profiles an older
checkout (only `load_model` and `two_stream_forward(model, ids, k, chunk_len)` are used).
Random token ids: a step's cost does not depend on the text.
"""

import argparse
import re
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import extemb_vllm
from extemb_vllm.model.checkpoint import load_embedder_weights, load_model
from extemb_vllm.train.two_stream import two_stream_forward

# op name -> group; the first pattern that matches wins (self time, so nested ops are not counted twice)
GROUPS = [
    ("matmul", r"aten::(mm|addmm|bmm|matmul|linear|_weight_int|mkldnn_|_mkl)"),
    ("attention", r"flash|scaled_dot_product|_SlotAttention|attention"),
    ("loss over the vocabulary", r"log_softmax|_LinearCrossEntropy|gather|scatter|topk|nll|cross_entropy"),
    ("copies and casts", r"aten::(copy_|to|_to_copy|clone|contiguous|cat|stack|index|empty|zeros|fill_)"),
    ("element-wise", r"aten::(mul|add|sub|div|pow|rsqrt|mean|silu|neg|exp|sum|where|sigmoid|cos|sin|"
                     r"masked_fill|lt|gt|ge|le|eq|threshold)"),
]


def group_of(name: str) -> str:
    return next((g for g, pat in GROUPS if re.search(pat, name)), "other")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="extemb-llama2")
    ap.add_argument("--init-embedder", default="extemb_vllm/weights/smollm2-135m-embedder.safetensors")
    ap.add_argument("--sample-len", type=int, default=4096)
    ap.add_argument("--chunk-len", type=int, default=512)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2, help="profiled steps, after one warm-up step")
    ap.add_argument("--bf16", action="store_true", help="bf16 LLM and autocast, as `extemb train --bf16`")
    args = ap.parse_args()

    # the trainer's set-up: frozen LLM in the compute dtype, trained embedder in fp32
    model, _ = load_model(args.model, dtype=torch.bfloat16 if args.bf16 else torch.float32)
    model.embedder.float()
    load_embedder_weights(model.embedder, args.init_embedder)
    model.embedder.train()
    params = [p for p in model.embedder.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, model.llm.config.vocab_size - 100, (args.sample_len,), generator=gen)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = two_stream_forward(model, ids, args.k, args.chunk_len)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: one-off allocations and kernel selection
    seconds = []
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            seconds.append(time.perf_counter() - t0)
    per_step = defaultdict(float)
    for ev in prof.key_averages():
        per_step[group_of(ev.key)] += ev.self_cpu_time_total / 1e6 / args.steps
    total = sum(per_step.values())
    wall = min(seconds)
    print(f"extemb_vllm from {extemb_vllm.__file__}; {args.sample_len} tokens, k={args.k}, "
          f"{'bf16' if args.bf16 else 'fp32'}, torch threads {torch.get_num_threads()}")
    print(f"step (profiled, best of {args.steps}): {wall:.1f} s = {args.sample_len / wall:.0f} training tokens/s")
    print(f"{'group':<28}{'s/step':>8}{'share':>8}")
    for g, s in sorted(per_step.items(), key=lambda kv: -kv[1]):
        print(f"{g:<28}{s:>8.2f}{s / total:>8.0%}")
    print(f"top ops by self time:\n{prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=12)}")


if __name__ == "__main__":
    main()
