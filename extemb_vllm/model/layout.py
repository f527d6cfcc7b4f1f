"""One request's layout: the single function every path that takes a request plans with.

The vLLM processor, the renderer (does an over-long plain prompt need compressing?) and the
Ray router all turn (context, prompt, the request's options) into the same thing: the whole
input in its one order, and the plan of what is compressed at which k. Planning here, once,
keeps them agreeing on every count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .config import CompressionPlan, ExtEmbConfig, check_request_options, plan_compression


@dataclass(frozen=True)
class RequestLayout:
    ids: list[int]  # the whole input: a leading BOS, the context, the rest of the prompt
    plan: CompressionPlan
    reserve: int  # positions kept free for generated tokens

    @property
    def chunks(self) -> list[list[int]]:
        """The compressed chunks' token ids, each encoded on its own."""
        return [self.ids[s:e] for s, e in self.plan.chunks]

    @property
    def raw_ids(self) -> list[int]:
        return self.ids[self.plan.n_compressed :]

    def slots_per_chunk(self) -> list[int]:
        return [-(-(e - s) // self.plan.k) for s, e in self.plan.chunks]


def join_context(context: Sequence[int], prompt: Sequence[int], bos_token_id: int | None) -> list[int]:
    """The one input order: a BOS the prompt starts with goes first, then the context, then the
    rest of the prompt."""
    context, prompt = list(context), list(prompt)
    if context and prompt and bos_token_id is not None and prompt[0] == bos_token_id:
        return [bos_token_id] + context + prompt[1:]
    return context + prompt


def plan_request(context: Sequence[int], prompt: Sequence[int], options: Mapping[str, object], cfg: ExtEmbConfig,
                 bos_token_id: int | None) -> RequestLayout:
    """(context, prompt, layout options as the request gave them) -> the checked layout. Options
    left out take the checkpoint's defaults (reserve included: a server keeps room to generate)."""
    opts = check_request_options({k: v for k, v in options.items() if v is not None}, cfg)
    ids = join_context(context, prompt, bos_token_id)
    reserve = cfg.reserve if opts.get("reserve") is None else opts["reserve"]
    plan = plan_compression(len(ids), cfg, k=opts.get("k"), raw_tail=opts.get("raw_tail"), reserve=reserve,
                            fill_window=opts.get("fill_window"), append_stable=opts.get("append_stable"))
    return RequestLayout(ids, plan, reserve)

