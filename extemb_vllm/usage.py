"""What a response's `usage` says, alike on both servers.

As every OpenAI-compatible server does, `prompt_tokens` counts the tokens the client sent (the
prompt after the chat template; over the Ray app, a registered document's tokens too), and
`total_tokens` = `prompt_tokens` + `completion_tokens`. What the engine read goes in an extension:

    "usage": {"prompt_tokens": 12510, "completion_tokens": 48, "total_tokens": 12558,
              "extemb": {"prompt_positions": 3841, "compact_slots": 724, "raw_positions": 3117,
                         "compressed_tokens": 9393, "k": 16}}

    prompt_positions   positions the LLM read: compact_slots + raw_positions
    compact_slots      compact embeddings standing for compressed_tokens tokens
    raw_positions      tokens read as they are
    compressed_tokens  tokens read through the compact slots
    k                  tokens per compact slot (null: nothing was compressed; for a batch of
                       prompts, the largest)

Sums over the prompts of a batched completion request; a prompt that fits the window has
prompt_positions = its tokens and no slots.
"""

from __future__ import annotations

EXTENSION = "extemb"


def prompt_layout(sent_tokens: int, plan) -> dict:
    """One prompt's figures: `plan` is its CompressionPlan (k None: read raw)."""
    if plan is None or plan.k is None:
        return {"sent_tokens": sent_tokens, "prompt_positions": sent_tokens, "compact_slots": 0,
                "raw_positions": sent_tokens, "compressed_tokens": 0, "k": None}
    return {"sent_tokens": sent_tokens, "prompt_positions": plan.llm_length, "compact_slots": plan.n_slots,
            "raw_positions": plan.n_raw, "compressed_tokens": plan.n_compressed, "k": plan.k}


def usage(layouts: list[dict], completion_tokens: int | None) -> dict:
    """The usage object of a response over these prompts' layouts."""
    sent = sum(lay["sent_tokens"] for lay in layouts)
    ks = [lay["k"] for lay in layouts if lay["k"] is not None]
    extension = {key: sum(lay[key] for lay in layouts)
                 for key in ("prompt_positions", "compact_slots", "raw_positions", "compressed_tokens")}
    return {"prompt_tokens": sent, "completion_tokens": completion_tokens,
            "total_tokens": sent + (completion_tokens or 0), EXTENSION: {**extension, "k": max(ks) if ks else None}}
