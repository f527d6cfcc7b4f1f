"""Offline batch generation over many long documents with vLLM and the plug-in.

    python examples/offline_batch.py data/shakespeare/heldout/*.txt --tokens 8000

Each document is given as the request's "context" (compressed where it does not
fit the window); the prompt asks for a continuation. vLLM batches the embedder
over the chunks of all requests in a step.
"""

import argparse
import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main():
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--model", default="extemb-llama2")
    ap.add_argument("--tokens", type=int, default=8000, help="tokens of each document to read")
    ap.add_argument("--k", type=int, help="fixed k (default: adaptive)")
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()

    tok = AutoTokenizer.from_pretrained(args.model)
    llm = LLM(model=args.model, limit_mm_per_prompt={"context": 1})
    requests = []
    for path in args.files:
        ids = tok(open(path, encoding="utf-8").read()).input_ids[: args.tokens]
        context = {"token_ids": ids[:-32]} | ({"k": args.k} if args.k else {})
        requests.append({"prompt_token_ids": ids[-32:], "multi_modal_data": {"context": context}})
    outputs = llm.generate(requests, SamplingParams(max_tokens=args.max_tokens, temperature=0))  # progress bar
    for path, out in zip(args.files, outputs):
        print(f"\n== {path}: the engine read {len(out.prompt_token_ids)} positions for {args.tokens} tokens")
        print(out.outputs[0].text)


if __name__ == "__main__":
    main()
