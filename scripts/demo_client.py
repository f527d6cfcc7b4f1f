"""`make demo`'s client: one document longer than the base model's context, sent with the OpenAI
client to `vllm serve --model extemb-llama2` and, the same request, to plain vLLM serving the same
base model.

    python scripts/demo_client.py --base-url http://127.0.0.1:8000/v1 [--plain-url http://127.0.0.1:8001/v1]

Sampling is SmolLM2-Instruct's own (its model card: temperature 0.2, top_p 0.9): greedy decoding
makes a 135M model loop. Not seeded, so the answers vary from run to run, as a user's would.
"""

import argparse
import re
import time
from pathlib import Path

import openai

DOCUMENT = Path(__file__).resolve().parent.parent / "data/shakespeare/heldout/antony_and_cleopatra.txt"
SAMPLING = {"temperature": 0.2, "top_p": 0.9}
QUESTION = "\n\nWhat news does the messenger bring Cleopatra? Answer in one sentence."
ANSWER = "Antony has married Octavia"  # in the default document's last scene: to judge the answer by


HEADING = re.compile(r"^([A-Z][A-Z '\-]+)\.$", re.M)  # a speech's heading: CLEOPATRA.


def document(path: Path, chars: int) -> tuple[str, str, str]:
    """(the text's first `chars` characters cut after a whole speech, the next speech's heading,
    its first line as written)."""
    text = path.read_text()
    cut = text.rfind("\n\n", 0, chars)
    nxt = HEADING.search(text, cut)
    return text[:nxt.start()].rstrip() + "\n\n", nxt.group(0), text[nxt.end():].strip().splitlines()[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--plain-url", help="plain vLLM on the same base model, for comparison")
    ap.add_argument("--model", default="extemb-llama2")
    ap.add_argument("--document", type=Path, default=DOCUMENT)
    ap.add_argument("--chars", type=int, default=48_000)
    args = ap.parse_args()

    client = openai.OpenAI(base_url=args.base_url, api_key="unused", max_retries=0, timeout=900)
    card = client.models.list().data[0]
    doc, heading, written = document(args.document, args.chars)
    prompt = doc + heading + "\n"  # the next speech: its heading given, the model writes its line
    print(f"request: the first {len(doc):,} characters of {args.document.stem} (held out from training)")
    if args.plain_url:
        plain = openai.OpenAI(base_url=args.plain_url, api_key="unused", max_retries=0, timeout=900)
        plain_card = plain.models.list().data[0]
        try:
            plain.completions.create(model=plain_card.id, prompt=prompt, max_tokens=48, stop=["\n\n"], **SAMPLING)
            print(f"\nplain vLLM, same base ({plain_card.max_model_len} positions): answered")
        except openai.BadRequestError as e:
            message = e.body.get("message", str(e)) if isinstance(e.body, dict) else str(e)
            print(f"\nplain vLLM, same base ({plain_card.max_model_len:,} positions): refused, {e.status_code}:\n"
                  f"  {message.split(' (parameter=')[0]}")
    print(f"\nvllm serve --model extemb-llama2 (accepts up to {card.max_model_len:,} tokens; a 4,096-position "
          f"window, its KV cache sized for it):")

    t = time.perf_counter()
    r = client.completions.create(model=args.model, prompt=prompt, max_tokens=48, stop=["\n\n"], **SAMPLING)
    took = time.perf_counter() - t
    read = r.usage.model_extra["extemb"]
    print(f"  {r.usage.prompt_tokens:,} tokens sent; the engine read {read['prompt_positions']:,} positions: "
          f"{read['compact_slots']:,} compact slots for the oldest {read['compressed_tokens']:,} tokens "
          f"(k={read['k']}) + the last {read['raw_positions']:,} tokens raw; {took:.1f} s")
    print("\n--- completion: the document's end and the next speech's heading; the model writes the speech ---")
    print("...\n" + "\n".join(doc.rstrip().splitlines()[-8:]) + f"\n\n{heading}\n>>> "
          + r.choices[0].text.strip().replace("\n", "\n>>> "))
    print(f"(as written: {written})")

    known = f" (in the text: {ANSWER})" if (args.document, args.chars) == (DOCUMENT, 48_000) else ""
    print(f"\n--- chat, streamed: \"{QUESTION.strip()}\"{known} ---")
    t = time.perf_counter()
    stream = client.chat.completions.create(model=args.model, max_tokens=32, stop=["\n"], stream=True, **SAMPLING,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": doc + QUESTION}])
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    read = usage.model_extra["extemb"]
    print(f"\n  ({usage.prompt_tokens:,} tokens sent, {read['prompt_positions']:,} positions read; "
          f"{time.perf_counter() - t:.1f} s)")


if __name__ == "__main__":
    main()
