"""What the compact slots look like to the frozen LLM: their size against the token embeddings they
stand in for (docs/benchmarks.md, section 5, stretch 5: the "output rows scaled to the token
embeddings' statistics" arm of issue 27 starts from these figures).

    .venv/bin/python scripts/slot_statistics.py --model extemb-llama2 --text data/python-docs/heldout \
        data/shakespeare/heldout --chunks 8 --k 16

The slots enter the LLM where token embeddings do (input rows of layer 0), but they are the output
of the embedder's L layers: a residual stream, not a table row. Printed per kind of row: the L2
norm (mean, median, max), the RMS over all entries, the shared energy (the mean row's energy over
the rows' mean energy: how much of a row every row has in common), and the cosine between each slot
and the frozen LLM's own hidden state after L layers at the same position (where the embedder
started: training moved it this far).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from extemb_vllm.model.checkpoint import load_model  # noqa: E402
from extemb_vllm.model.embedder import keep_positions  # noqa: E402
from extemb_vllm.texts import cut_spans, read_texts  # noqa: E402


def row_stats(rows: torch.Tensor) -> dict:
    norms = rows.float().norm(dim=-1)
    return {"norm_mean": norms.mean().item(), "norm_median": norms.median().item(), "norm_max": norms.max().item(),
            "rms": rows.float().pow(2).mean().sqrt().item(),
            # the part every row shares: the mean row's energy over the rows' mean energy (1 = all alike)
            "shared": (rows.float().mean(0).pow(2).sum() / norms.pow(2).mean()).item()}


@torch.no_grad()
def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="extemb-llama2", help="a built checkpoint directory")
    p.add_argument("--text", nargs="+", required=True, help="files or folders of .txt")
    p.add_argument("--chunks", type=int, default=8, help="chunks of the checkpoint's chunk size to encode")
    p.add_argument("--k", type=int, default=16)
    args = p.parse_args()

    model, tok = load_model(args.model)
    chunk = model.ext.chunk_size
    streams = [torch.tensor(tok(text)["input_ids"]) for _, text in read_texts(args.text)]
    chunks = cut_spans(streams, chunk, args.chunks)
    embed = model.embed_tokens
    layers = model.embedder.config.num_hidden_layers
    keep = keep_positions(chunk, args.k)
    slots = torch.cat([h[keep] for h in model.embedder.encode_chunks(chunks, embed)])
    # the frozen LLM's residual stream after the same number of layers, chunk by chunk from position 0
    hidden = model.llm.model(input_ids=torch.stack(chunks), output_hidden_states=True).hidden_states[layers]
    llm_rows = hidden[:, keep].reshape(-1, hidden.shape[-1])
    kinds = {"token table (every row)": embed.weight, "token embeddings of the chunks": embed(torch.cat(chunks)),
             f"slots (k={args.k})": slots, f"frozen LLM after {layers} layers": llm_rows}
    print(f"{args.model}: {len(chunks)} chunks of {chunk} tokens, {slots.shape[0]} slots")
    print(f"{'rows':34s} {'norm mean':>10s} {'median':>8s} {'max':>8s} {'rms':>8s} {'shared':>8s}")
    stats = {name: row_stats(rows) for name, rows in kinds.items()}
    for name, s in stats.items():
        print(f"{name:34s} {s['norm_mean']:10.2f} {s['norm_median']:8.2f} {s['norm_max']:8.2f} {s['rms']:8.3f} "
              f"{s['shared']:8.3f}")
    ratio = stats[f"slots (k={args.k})"]["norm_mean"] / stats["token embeddings of the chunks"]["norm_mean"]
    cosine = torch.nn.functional.cosine_similarity(slots.float(), llm_rows.float()).mean().item()
    print(f"slot norm / token-embedding norm: {ratio:.1f}x; cosine(slot, frozen LLM's row): {cosine:.3f}")


if __name__ == "__main__":
    main()
