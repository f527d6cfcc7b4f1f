"""Send a document far longer than the model's window to `vllm serve --model extemb-llama2`.

    python examples/openai_client.py [--base-url http://127.0.0.1:8000/v1] [--tokens 12000]

Any OpenAI client works unchanged: the server compresses what does not fit.
Per-request control of k and the raw tail goes in `mm_processor_kwargs`
(an extra body field; the server must be started with --trust-request-mm-kwargs).
"""

import argparse
import time
from pathlib import Path

from openai import OpenAI

DEFAULT_DOC = Path(__file__).resolve().parent.parent / "data/shakespeare/heldout/antony_and_cleopatra.txt"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default="extemb-llama2")
    ap.add_argument("--document", default=str(DEFAULT_DOC))
    ap.add_argument("--chars", type=int, default=48_000, help="characters of the document to send")
    ap.add_argument("--k", type=int, help="force this k (default: the server picks the smallest that fits)")
    args = ap.parse_args()

    client = OpenAI(base_url=args.base_url, api_key="unused")
    card = client.models.list().data[0]
    print(f"model {card.id}: accepts up to {card.max_model_len} tokens per request")
    document = Path(args.document).read_text()[: args.chars]
    extra = {"mm_processor_kwargs": {"k": args.k}} if args.k else None

    t = time.perf_counter()
    r = client.completions.create(model=args.model, prompt=document, max_tokens=48, temperature=0, extra_body=extra)
    read = (r.usage.model_extra or {}).get("extemb", {}).get("prompt_positions")  # the plug-in's usage extension
    print(f"\n--- completion of a {len(document)}-character document ({time.perf_counter() - t:.1f}s; "
          f"{r.usage.prompt_tokens} tokens sent, the engine read {read} positions) ---")
    print(document[-300:] + " >>>" + r.choices[0].text)

    print("\n--- chat, streamed ---")
    stream = client.chat.completions.create(
        model=args.model, max_tokens=64, temperature=0, stream=True, extra_body=extra,
        messages=[{"role": "user", "content": document + "\n\nIn one sentence: who are the main characters?"}])
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
