"""Send a long document through the Ray app started with `serve run examples/ray/extemb.yaml`."""

import ray
from ray import serve
from transformers import AutoTokenizer

ray.init(address="auto")
router = serve.get_app_handle("extemb")
tok = AutoTokenizer.from_pretrained("extemb-llama2")
document = open("data/shakespeare/heldout/antony_and_cleopatra.txt").read()[:48_000]
context = tok(document).input_ids
prompt = tok("\n\nWho are the main characters of this play?\nAnswer:").input_ids
out = router.generate.remote(prompt, context, max_tokens=48).result()
print(f"{len(context)} context tokens read as {out.prompt_positions} positions:\n{out.text}")
