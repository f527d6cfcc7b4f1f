"""Talk to the Ray app (`serve run examples/ray/extemb.yaml`) with the OpenAI client: the same
code as against `vllm serve --model extemb-llama2`, plus a registered document."""

from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
model = client.models.list().data[0].id
document = open("data/shakespeare/heldout/antony_and_cleopatra.txt").read()[:48_000]

# 1. A long prompt, as with vllm serve: compressed on the way in.
r = client.completions.create(model=model, prompt=document + "\n\nSummary:", max_tokens=32)
print(f"completion ({r.usage.prompt_tokens} positions read):", r.choices[0].text)

# 2. Register the document once, then ask about it with any k: its chunks are encoded once.
doc = client.post("/contexts", body={"text": document}, cast_to=object)
for k in (16, 32):
    stream = client.chat.completions.create(
        model=model, max_tokens=32, stream=True,
        messages=[{"role": "user", "content": "Who are the main characters of this play?"}],
        extra_body={"context_id": doc["id"], "k": k})
    print(f"k={k}:", "".join(c.choices[0].delta.content or "" for c in stream))
