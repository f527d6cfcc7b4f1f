"""Read long documents through the plain-transformers reference model and continue each.

    python examples/reference_generate.py data/shakespeare/heldout/*.txt --tokens 8000

The vLLM plug-in will serve the same model; this is the reference it must match.
"""

import argparse

import torch
from tqdm import tqdm

from extemb_vllm.model.checkpoint import load_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--model", default="extemb-llama2")
    ap.add_argument("--tokens", type=int, default=8000, help="tokens of each document to read")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args()

    model, tok = load_model(args.model, device="cuda" if torch.cuda.is_available() else "cpu")
    for path in tqdm(args.files, desc="documents"):
        ids = tok(open(path, encoding="utf-8").read()).input_ids[: args.tokens]
        new, plan = model.generate(ids, args.max_new_tokens)
        tqdm.write(f"\n== {path}: {len(ids)} tokens -> k={plan.k}, {plan.n_slots} compact + {plan.n_raw} raw")
        tqdm.write(tok.decode(new, skip_special_tokens=True))


if __name__ == "__main__":
    main()
