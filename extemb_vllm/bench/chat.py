"""`extemb bench chat`: how a growing chat reuses vLLM's caches, window-filling layout against
append-stable layout, in one `vllm serve --model <ckpt>` run.

Rules (per request, `mm_processor_kwargs`):

  fill     {"append_stable": false}  today's rule: the raw tail fills the window, so the
                                     compressed/raw boundary moves with every token
  stable   {"append_stable": true}   whole chunks compressed in steps: appending leaves
                                     earlier slots and raw positions where they were

Scenarios, each once per rule, each on its own stretch of held-out text (no rule's prefix or
chunk store can serve another's), the same lengths for both:

  follow-ups  one long document + a question, then N short follow-up questions
  growing     each turn appends the next S characters of a document + a short question

Per turn: positions read (usage.extemb.prompt_positions), time to first token, prefix-cache hits
and queries, chunks encoded and chunks served from the plug-in's chunk cache (deltas of the
server's Prometheus counters on /metrics: vLLM's and the plug-in's).
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import numpy as np

from ..machine import machine
from .servers import VllmServer, has_metric, metric, metrics_text, server_settings

RULES = {"fill": {"append_stable": False}, "stable": {"append_stable": True}}
SCENARIOS = ("follow-ups", "growing")
FIRST_QUESTION = "\n\nQuestion: who appears in the text above? Answer briefly."
FOLLOW_UPS = ("Where does the last scene take place?", "Name one object that is mentioned.",
              "What happens at the very end?", "Who speaks first?", "What is the mood of the passage?")
STEP_QUESTION = "\n\nQuestion: what happens in this part? Answer briefly."
PREFIX_COUNTERS = ("vllm:prefix_cache_hits", "vllm:prefix_cache_queries")
# the plug-in's counters on /metrics (extemb_vllm/metrics.py), by the names the rows give them
ENCODER_COUNTERS = {"chunks_encoded": "extemb_chunks_encoded_total", "chunks_reused": "extemb_chunks_cached_total"}


# -- workload -------------------------------------------------------------------------------------
def held_out_text(paths) -> str:
    from ..texts import read_texts

    texts = read_texts(paths)
    austen = [name for name, _ in texts if re.search(r"austen", name, re.I)]
    if austen:  # her novels are reserved for independent evaluation
        raise ValueError(f"Jane Austen's texts are not benchmark text: {austen}")
    return "\n\n".join(text for _, text in texts)


def follow_up_turns(doc: str, n: int) -> list[str]:
    """The user messages of a follow-up chat: the document with a question, then n questions."""
    if n > len(FOLLOW_UPS):
        raise ValueError(f"at most {len(FOLLOW_UPS)} follow-up questions, got {n}")
    return [doc + FIRST_QUESTION, *FOLLOW_UPS[:n]]


def growing_turns(doc: str, step_chars: int, turns: int) -> list[str]:
    """The user messages of a growing chat: the document's next step_chars characters each turn."""
    return [doc[i * step_chars : (i + 1) * step_chars] + STEP_QUESTION for i in range(turns)]


def workload(text: str, doc_chars: int, follow_ups: int, step_chars: int, growth_turns: int,
             scenarios=SCENARIOS) -> dict:
    """User messages per (scenario, rule) plus an untimed warm-up message, each cut from its own
    stretch of `text` (consecutive, disjoint), equal lengths for both rules."""
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        raise ValueError(f"unknown scenario(s) {sorted(unknown)}; choose from {list(SCENARIOS)}")
    sizes = {s: {"follow-ups": doc_chars, "growing": step_chars * growth_turns}[s] for s in scenarios}
    need = step_chars + len(RULES) * sum(sizes.values())
    if len(text) < need:
        raise ValueError(f"the held-out text has {len(text)} characters, {need} wanted: "
                         f"give more --text or shorter --doc-chars / --step-chars")
    warm_up = text[:step_chars] + STEP_QUESTION  # past the window: the embedder runs too
    at, chats = step_chars, {}
    for scenario in scenarios:
        for rule in RULES:
            doc, at = text[at : at + sizes[scenario]], at + sizes[scenario]
            chats[scenario, rule] = (follow_up_turns(doc, follow_ups) if scenario == "follow-ups"
                                     else growing_turns(doc, step_chars, growth_turns))
    return {"warm_up": warm_up, "chats": chats}


# -- counters -------------------------------------------------------------------------------------
def prefix_counter(read_metric, name: str) -> float:
    """A Prometheus counter by its vLLM name: prometheus_client exports counters with a `_total`
    suffix, other exporters without; a counter lives under one of the two."""
    return read_metric(name + "_total") or read_metric(name)


def server_counters(base_url: str):
    """read_counters() for a live server: prefix-cache tokens and encoder chunks, cumulative."""

    def read():
        text = metrics_text(base_url)
        prefix = {name.split(":")[1]: prefix_counter(lambda m: metric(base_url, m, text), name) for name in PREFIX_COUNTERS}
        return {**prefix, **{key: int(metric(base_url, name, text)) for key, name in ENCODER_COUNTERS.items()}}

    return read


def positions_read(usage) -> int:
    """The positions the engine read, from a response's usage (its `extemb` extension)."""
    extension = (usage.model_extra or {}).get("extemb") if hasattr(usage, "model_extra") else getattr(usage, "extemb", None)
    if not extension:
        raise RuntimeError("the response's usage has no `extemb` extension: is the plug-in's middleware on?")
    return int(extension["prompt_positions"])


def delta(before: dict, after: dict) -> dict:
    return {key: after[key] - before[key] for key in after}


# -- what each turn's positions hold --------------------------------------------------------------
def position_contents(layout) -> list:
    """What each LLM position of a request holds: (chunk, k, slot) for a compact slot, the token
    id for a raw one. Two requests share a prefix-cache block only where these agree."""
    plan, slots = layout.plan, []
    if plan.k is not None:
        for chunk, n in zip(layout.chunks, layout.slots_per_chunk()):
            key = hash((plan.k, tuple(chunk)))
            slots += [(key, j) for j in range(n)]
    return slots + layout.raw_ids


def unchanged_positions(previous: list, current: list) -> int:
    """Leading positions whose content did not change from one turn to the next."""
    n = min(len(previous), len(current))
    return next((i for i in range(n) if previous[i] != current[i]), n)


def chat_planner(model_dir: Path):
    """(messages, a rule's options) -> the request's layout, planned as the server plans it (the
    served chat template, the checkpoint's config), to count the positions a turn left unchanged.
    The tokenizer is loaded once for every conversation of the run."""
    from transformers import AutoTokenizer

    from ..model import plan_request
    from ..model.checkpoint import read_extemb_config

    tok, ext = AutoTokenizer.from_pretrained(model_dir), read_extemb_config(model_dir)

    def plan(messages, options):
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        return plan_request([], ids, options, ext, None)

    return plan


# -- one conversation -----------------------------------------------------------------------------
def converse(client, model: str, turns: list[str], options: dict, max_tokens: int, read_counters,
             progress=lambda row: None, planner=None) -> list[dict]:
    """Send the user messages one turn at a time in one conversation (each turn adds the
    previous answer and the next message); one row per turn. With a planner ((messages, options)
    -> layout) each row also says how many leading positions the turn left unchanged."""
    messages, rows, contents, seen = [], [], None, set()  # seen: every chunk the layouts compressed so far
    for i, user in enumerate(turns):
        messages.append({"role": "user", "content": user})
        layout = planner(messages, options) if planner else None
        before = read_counters()
        answer, ttft, usage, latency = _stream(client, model, messages, options, max_tokens)
        d = delta(before, read_counters())
        prev = rows[-1]["positions"] if rows else None
        positions = positions_read(usage)
        unchanged = None
        if layout is not None:
            if layout.plan.llm_length != positions:  # the bench's plan must be the server's
                raise RuntimeError(f"turn {i}: planned {layout.plan.llm_length} positions, the server read "
                                   f"{positions}")
            now = position_contents(layout)
            unchanged = unchanged_positions(contents, now) if contents is not None else None
            contents = now
            seen |= {tuple(c) for c in layout.chunks}
        rows.append({
            "turn": i, "user_chars": len(user), "sent_tokens": usage.prompt_tokens, "positions": positions,
            "completion_tokens": usage.completion_tokens, "ttft_s": ttft, "latency_s": latency,
            "prefix_hits": d["prefix_cache_hits"], "prefix_queries": d["prefix_cache_queries"],
            "hit_share": _ratio(d["prefix_cache_hits"], d["prefix_cache_queries"]),
            # what the previous turn had that this one found in the prefix cache
            "reused_of_previous": _ratio(d["prefix_cache_hits"], prev),
            "chunks_encoded": d["chunks_encoded"], "chunks_reused": d["chunks_reused"],
            # positions the previous turn already had in the same place, and the share of them
            # vLLM's prefix cache served (it caches whole blocks, and never a prompt's last token)
            "unchanged": unchanged, "hits_of_unchanged": _ratio(d["prefix_cache_hits"], unchanged),
            # distinct chunk contents the conversation's layouts compressed up to this turn: each
            # encoded once means chunks_encoded summed over the turns equals this
            "distinct_chunks": len(seen) if layout is not None else None,
        })
        progress(rows[-1])
        messages.append({"role": "assistant", "content": answer})
    return rows


def _stream(client, model, messages, options, max_tokens):
    start = time.perf_counter()
    resp = client.chat.completions.create(
        model=model, messages=list(messages), max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"mm_processor_kwargs": options})
    answer, ttft, usage = [], None, None
    for chunk in resp:
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:
            continue
        c = chunk.choices[0]
        # an answer that is EOS at once has no content: its finish chunk marks the first token
        if ttft is None and (c.delta.content or c.finish_reason):
            ttft = time.perf_counter() - start
        answer.append(c.delta.content or "")
    if usage is None:
        raise RuntimeError("the stream carried no usage: the server ignored stream_options.include_usage")
    return "".join(answer), ttft, usage, time.perf_counter() - start


def _ratio(a, b):
    return a / b if b else None


# -- summary --------------------------------------------------------------------------------------
def summarise(rows: list[dict]) -> dict:
    first, rest = rows[0], rows[1:]
    follow = float(np.mean([r["ttft_s"] for r in rest])) if rest else None
    hits, queries = sum(r["prefix_hits"] for r in rows), sum(r["prefix_queries"] for r in rows)
    reused = [r["reused_of_previous"] for r in rest if r["reused_of_previous"] is not None]
    measured = [r for r in rest if r.get("unchanged")]
    unchanged = sum(r["unchanged"] for r in measured)
    encoded = sum(r["chunks_encoded"] for r in rows)
    return {
        "turns": len(rows), "first_ttft_s": first["ttft_s"], "follow_up_ttft_s": follow,
        "follow_up_vs_first": _ratio(follow, first["ttft_s"]) if follow is not None else None,
        "prefix_hits": hits, "prefix_queries": queries, "hit_share": _ratio(hits, queries),
        "reused_of_previous_mean": float(np.mean(reused)) if reused else None,
        "chunks_encoded": encoded, "chunks_reused": sum(r["chunks_reused"] for r in rows),
        "last_positions": rows[-1]["positions"],
        "unchanged": unchanged if measured else None,
        "hits_of_unchanged": _ratio(sum(r["prefix_hits"] for r in measured), unchanged) if measured else None,
        "distinct_chunks": rows[-1].get("distinct_chunks"),
    }


# -- the run --------------------------------------------------------------------------------------
def run(model_dir: Path, texts, doc_chars: int, follow_ups: int, step_chars: int, growth_turns: int,
        max_tokens: int, outdir: Path, dtype: str | None = None, scenarios=SCENARIOS) -> dict:
    """dtype None: the server's own choice, as users run it (the README's command)."""
    import openai

    work = workload(held_out_text(texts), doc_chars, follow_ups, step_chars, growth_turns, scenarios)
    outdir = Path(outdir).resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    res = {"model": str(model_dir), "machine": machine(), "command": " ".join(sys.argv),
           "settings": dict(doc_chars=doc_chars, follow_ups=follow_ups, step_chars=step_chars,
                            growth_turns=growth_turns, max_tokens=max_tokens, dtype=dtype,
                            texts=[str(t) for t in texts]),
           "rules": RULES, "conversations": []}
    with VllmServer(model_dir, outdir / "vllm-serve.log", dtype=dtype) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", timeout=1800, max_retries=0)
        read, planner = server_counters(server.base_url), chat_planner(model_dir)
        print("[bench chat] warm-up", file=sys.stderr)  # first-call costs stay out of the figures
        converse(client, server.model, [work["warm_up"]], RULES["fill"], max_tokens, read)
        for (scenario, rule), turns in work["chats"].items():
            print(f"[bench chat] {scenario} / {rule}: {len(turns)} turns", file=sys.stderr)
            rows = converse(client, server.model, turns, RULES[rule], max_tokens, read, progress=_progress,
                            planner=planner)
            res["conversations"].append({"scenario": scenario, "rule": rule, "turns": rows,
                                         "summary": summarise(rows)})
        res["server"] = server_settings(server.log)
        if not has_metric(server.base_url, ENCODER_COUNTERS["chunks_encoded"]):
            raise RuntimeError(f"{server.base_url}/metrics has no extemb_ series: the server runs without "
                               f"PROMETHEUS_MULTIPROC_DIR (see the README's serving command)")
    return res


def _progress(row):
    print(f"  turn {row['turn']}: {row['positions']} positions, TTFT{_f(row['ttft_s'], '.2f', 6)} s, "
          f"prefix hits {row['prefix_hits']:.0f} / {row['prefix_queries']:.0f}, "
          f"unchanged {row['unchanged']}, chunks encoded {row['chunks_encoded']} reused {row['chunks_reused']}",
          file=sys.stderr)


# -- output ---------------------------------------------------------------------------------------
def _f(x, fmt, width):
    return f"{'-':>{width}}" if x is None else f"{x:>{width}{fmt}}"


def format_table(res: dict) -> str:
    s = res["settings"]
    lines = [f"extemb bench chat: vllm serve --model {res['model']}; follow-ups: {s['doc_chars']}-char document "
             f"+ {s['follow_ups']} questions; growing: {s['growth_turns']} x {s['step_chars']} chars; "
             f"{s['max_tokens']} generated per turn; {res['machine']}",
             f"server: the README's command ({res.get('server') or 'settings not logged'})",
             "hits / queries: prefix-cache tokens of the turn; of prev: hits / the previous turn's positions; "
             "unchanged: leading positions the previous turn had in the same place (of unch: hits / them); "
             "enc / store: chunks encoded / served from the plug-in's store",
             f"{'scenario':<12}{'rule':<8}{'turn':>5}{'positions':>10}{'TTFT s':>9}{'hits':>8}{'queries':>9}"
             f"{'hit %':>7}{'of prev %':>11}{'unchanged':>10}{'of unch %':>10}{'enc':>6}{'store':>7}"]
    for conv in res["conversations"]:
        for r in conv["turns"]:
            lines.append(
                f"{conv['scenario']:<12}{conv['rule']:<8}{r['turn']:>5}{r['positions']:>10}"
                f"{_f(r['ttft_s'], '.3f', 9)}{r['prefix_hits']:>8.0f}{r['prefix_queries']:>9.0f}"
                f"{_f(_pct(r['hit_share']), '.1f', 7)}{_f(_pct(r['reused_of_previous']), '.1f', 11)}"
                f"{_f(r.get('unchanged'), 'd', 10)}{_f(_pct(r.get('hits_of_unchanged')), '.1f', 10)}"
                f"{r['chunks_encoded']:>6}{r['chunks_reused']:>7}")
    lines += ["", "summary: x first = mean follow-up TTFT / first TTFT; distinct = chunk contents the conversation's "
                  "layouts compressed (enc = distinct: each encoded once)",
              f"{'scenario':<12}{'rule':<8}{'TTFT 1st':>9}{'follow-up':>11}{'x first':>9}{'hits':>9}"
              f"{'queries':>9}{'hit %':>7}{'of prev %':>11}{'of unch %':>10}{'enc':>6}{'store':>7}{'distinct':>9}"]
    for conv in res["conversations"]:
        m = conv["summary"]
        lines.append(
            f"{conv['scenario']:<12}{conv['rule']:<8}{_f(m['first_ttft_s'], '.3f', 9)}"
            f"{_f(m['follow_up_ttft_s'], '.3f', 11)}{_f(m['follow_up_vs_first'], '.2f', 9)}"
            f"{m['prefix_hits']:>9.0f}{m['prefix_queries']:>9.0f}{_f(_pct(m['hit_share']), '.1f', 7)}"
            f"{_f(_pct(m['reused_of_previous_mean']), '.1f', 11)}{_f(_pct(m.get('hits_of_unchanged')), '.1f', 10)}"
            f"{m['chunks_encoded']:>6}{m['chunks_reused']:>7}"
            f"{_f(m.get('distinct_chunks'), 'd', 9)}")
    return "\n".join(lines)


def _pct(x):
    return None if x is None else 100 * x


def plot(res: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(dict.fromkeys(c["scenario"] for c in res["conversations"]))
    fig, axes = plt.subplots(1, len(scenarios), figsize=(5.5 * len(scenarios), 4.2), squeeze=False)
    for ax, scenario in zip(axes[0], scenarios):
        for conv in (c for c in res["conversations"] if c["scenario"] == scenario):
            rows = [r for r in conv["turns"] if r["ttft_s"] is not None]
            ax.plot([r["turn"] for r in rows], [r["ttft_s"] for r in rows], "o-", label=conv["rule"])
        ax.set_yscale("log")  # the first turn's pre-fill dwarfs a cached follow-up
        ax.set(xlabel="turn", ylabel="time to first token (s)", title=scenario)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle(f"extemb bench chat: {res['model']}, {res['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
