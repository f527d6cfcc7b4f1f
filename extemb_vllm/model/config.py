"""The `extemb` section of a checkpoint's config.json, and the rules that use it.

Everything here is plain arithmetic on token counts: which tokens are compressed,
how many compact slots they take at a given k, and which k fits a window. The
reference model, the trainer, the evaluation and the vLLM plug-in all plan with
these functions, so they agree on every count.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


EMBEDDER_PREFIX = "embedder."  # the embedder's tensors in a checkpoint: embedder.layers.N.*


class ContextError(ValueError):
    """Input that the model cannot take (empty, bad k, does not fit); the message says why."""


@dataclass(frozen=True)
class ExtEmbConfig:
    embedder_layers: int = 8  # the paper's L: first L decoder layers of the base
    # tokens per independently encoded chunk at inference: the chunk length the shipped
    # embedder is trained on (its outputs depend on positions inside the chunk)
    chunk_size: int = 512
    # the k served; adaptive k picks the smallest that fits. The paper's ladder also has 2;
    # the shipped embedder was trained on these (the trainer's --k-ladder), so these are served
    k_ladder: tuple[int, ...] = (4, 8, 16, 32)
    window: int = 4096  # positions the LLM sees: compact slots + raw tail (+ generated tokens)
    raw_tail: int = 1024  # fewest most recent tokens kept as normal token embeddings
    reserve: int = 256  # window positions a server keeps free for generated tokens by default
    # Keep as many recent tokens raw as the window holds beside the compact slots, so only
    # what must be compressed is (a raw token is worth more than a compact slot). Off: exactly
    # `raw_tail` tokens stay raw, and a forced k compresses the rest even of an input that fits.
    fill_window: bool = True
    # Plan so that appending tokens leaves every earlier compact slot and raw position where it
    # was (chat: a follow-up reuses the prefix cache): only whole chunks are compressed, as few
    # as fit, and k is chosen per band of total length. Off (or a request that sets
    # `fill_window`): the window-filling / fixed raw tail rule above, whose boundary moves with
    # every token. On by default: it cost no quality where measured and a chat's follow-up
    # reads from the prefix cache (docs/benchmarks.md section 9).
    append_stable: bool = True

    def __post_init__(self):
        object.__setattr__(self, "k_ladder", tuple(sorted(int(k) for k in self.k_ladder)))
        if self.embedder_layers < 1:
            raise ValueError(f"embedder_layers must be >= 1, got {self.embedder_layers}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if not self.k_ladder or self.k_ladder[0] < 1:
            raise ValueError(f"k_ladder must be non-empty integers >= 1, got {self.k_ladder}")
        if not 0 < self.raw_tail < self.window:
            raise ValueError(f"need 0 < raw_tail < window, got raw_tail={self.raw_tail}, window={self.window}")
        if not 0 <= self.reserve < self.window - self.raw_tail:
            raise ValueError(f"need 0 <= reserve < window - raw_tail, got reserve={self.reserve}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["k_ladder"] = list(self.k_ladder)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ExtEmbConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown keys in the extemb config: {sorted(unknown)}")
        return cls(**d)

    def replace(self, **changes) -> "ExtEmbConfig":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


LAYOUT_OPTIONS = ("k", "raw_tail", "reserve", "fill_window", "append_stable")  # per request, in mm_processor_kwargs


def check_request_options(opts: dict, cfg: "ExtEmbConfig") -> dict:
    """Per-request k / raw_tail / reserve / fill_window / append_stable, checked the same way wherever a request
    comes in. A served k must be one of the ladder's: the embedder was trained for those."""
    if opts.get("k") is not None:
        check_k(opts["k"])
        if opts["k"] not in cfg.k_ladder:
            raise ContextError(f"k={opts['k']} is not served by this model; choose one of {list(cfg.k_ladder)}")
    for key in ("raw_tail", "reserve"):
        value = opts.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ContextError(f"{key} must be a non-negative integer, got {value!r}")
    for key in ("fill_window", "append_stable"):
        if opts.get(key) is not None and not isinstance(opts[key], bool):
            raise ContextError(f"{key} must be true or false, got {opts[key]!r}")
    if opts.get("append_stable") and opts.get("fill_window") is not None:
        raise ContextError("fill_window and append_stable are two different layout rules: give one of them")
    # said here, by name: otherwise an over-long input fails later as "does not fit the window"
    reserve = cfg.reserve if opts.get("reserve") is None else opts["reserve"]
    if reserve >= cfg.window:
        raise ContextError(f"reserve={reserve} must be smaller than the window of {cfg.window} positions")
    if opts.get("raw_tail") is not None and opts["raw_tail"] + reserve >= cfg.window:
        raise ContextError(f"raw_tail={opts['raw_tail']} does not fit the window: raw_tail + reserve ({reserve}) "
                           f"must be < {cfg.window} positions, leaving room for the compact slots")
    return opts


def layout_options(kwargs, cfg: "ExtEmbConfig") -> dict:
    """A request's `mm_processor_kwargs` (JSON as sent) -> its checked layout options. Not an
    object, an unknown key or a wrong type is the client's error, said by name."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise ContextError(f"mm_processor_kwargs must be a JSON object with any of {list(LAYOUT_OPTIONS)}, "
                           f"got {json_type(kwargs)}")
    unknown = sorted(set(kwargs) - set(LAYOUT_OPTIONS))
    if unknown:
        raise ContextError(f"unknown key(s) in mm_processor_kwargs: {unknown}; this model takes {list(LAYOUT_OPTIONS)}")
    return check_request_options({k: v for k, v in kwargs.items() if v is not None}, cfg)


def json_type(value) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def chunk_bounds(n_tokens: int, chunk_size: int) -> list[tuple[int, int]]:
    """[start, end) of each chunk, aligned to the start of the document.

    Alignment to the start (not the end) means a document that grows only changes
    its last chunk, so earlier chunks can be reused from a cache.
    """
    return [(s, min(s + chunk_size, n_tokens)) for s in range(0, n_tokens, chunk_size)]


def compact_slots(n_tokens: int, k: int, chunk_size: int) -> int:
    """Compact embeddings that `n_tokens` compressed tokens become: ceil(len/k) per chunk."""
    check_k(k)
    full, rest = divmod(n_tokens, chunk_size)
    return full * -(-chunk_size // k) + -(-rest // k)


def check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise ContextError(f"k must be an integer >= 1, got {k!r}")
    if k < 1:
        raise ContextError(f"k must be >= 1, got {k}")
    return k


@dataclass(frozen=True)
class CompressionPlan:
    """How one input of `n_tokens` is laid out for the LLM."""

    n_tokens: int
    n_compressed: int  # oldest tokens, replaced by compact embeddings
    k: int | None  # None when nothing is compressed
    n_slots: int  # compact embeddings in the LLM input
    chunk_size: int
    chunks: list[tuple[int, int]] = field(repr=False)

    @property
    def n_raw(self) -> int:
        return self.n_tokens - self.n_compressed

    @property
    def llm_length(self) -> int:
        return self.n_slots + self.n_raw


def layout_rule(cfg: ExtEmbConfig, fill_window: bool | None = None, append_stable: bool | None = None) -> str:
    """The rule a plan follows: "append_stable", "fill_window" or "raw_tail" (exactly the raw tail
    kept). A given fill_window chooses its own rule; otherwise the config's default."""
    if (cfg.append_stable and fill_window is None) if append_stable is None else append_stable:
        return "append_stable"
    return "fill_window" if (cfg.fill_window if fill_window is None else fill_window) else "raw_tail"


def plan_compression(
    n_tokens: int,
    cfg: ExtEmbConfig,
    k: int | None = None,
    raw_tail: int | None = None,
    window: int | None = None,
    reserve: int = 0,
    fill_window: bool | None = None,
    append_stable: bool | None = None,
) -> CompressionPlan:
    """Decide what to compress so the input (plus `reserve` tokens to generate) fits.

    Input that fits the window as it is stays raw. Otherwise k is the given one, or
    the smallest of the ladder for which the compact slots of the oldest
    `n_tokens - raw_tail` tokens + raw tail + reserve fit the window; with
    `fill_window` (the config's default) the raw tail then grows to the most recent
    tokens the window still holds at that k. Without it exactly `raw_tail` tokens
    stay raw, and a given k forces compression even of an input that fits.
    With `append_stable` (the config's default, unless `fill_window` is given) the layout is
    `stable_plan`'s wherever that rule has one, and the window-filling one beyond (the last band
    of the extended length).
    """
    window = cfg.window if window is None else window
    raw_tail = cfg.raw_tail if raw_tail is None else raw_tail
    rule = layout_rule(cfg, fill_window, append_stable)
    stable, fill = rule == "append_stable", rule != "raw_tail"
    if n_tokens <= 0:
        raise ContextError("empty input: there are no tokens to read")
    if raw_tail < 1:
        raise ContextError(f"raw_tail must be >= 1, got {raw_tail}")
    budget = window - reserve
    if n_tokens <= budget and (k is None or fill):
        return CompressionPlan(n_tokens, 0, None, 0, cfg.chunk_size, [])
    if k is not None:
        check_k(k)
    if stable and (plan := stable_plan(n_tokens, cfg, k, raw_tail, budget)) is not None:
        return plan
    raw = min(raw_tail, n_tokens)
    n_compressed = n_tokens - raw
    if n_compressed == 0:  # a forced k on an input no longer than the raw tail
        return CompressionPlan(n_tokens, 0, None, 0, cfg.chunk_size, [])
    candidates = [k] if k is not None else list(cfg.k_ladder)
    for kk in candidates:
        slots = compact_slots(n_compressed, kk, cfg.chunk_size)
        if slots + raw <= budget:
            if fill:
                raw = widest_raw_tail(n_tokens, raw, kk, cfg.chunk_size, budget)
                n_compressed = n_tokens - raw
                slots = compact_slots(n_compressed, kk, cfg.chunk_size)
            return CompressionPlan(
                n_tokens, n_compressed, kk, slots, cfg.chunk_size, chunk_bounds(n_compressed, cfg.chunk_size)
            )
    kk = candidates[-1]
    slots = compact_slots(n_compressed, kk, cfg.chunk_size)
    which = f"k={kk}" if k is not None else f"the largest k of the ladder {list(cfg.k_ladder)}, k={kk},"
    raise ContextError(
        f"input of {n_tokens} tokens does not fit: with {which} its {n_compressed} compressed tokens "
        f"take {slots} compact slots, plus a raw tail of {raw} tokens"
        + (f" and {reserve} tokens to generate" if reserve else "")
        + f" = {slots + raw + reserve} > window {window}. "
        f"Use a larger k, a shorter raw tail or a shorter input (at most about "
        f"{(budget - raw) * kk + raw} tokens at k={kk})."
    )


def stable_limit(k: int, cfg: ExtEmbConfig, raw_tail: int, budget: int) -> int:
    """The longest input for which the append-stable rule has a plan at k, for every shorter one too.

    Only whole chunks are compressed, so the raw part is raw_tail .. raw_tail + chunk_size - 1
    tokens when as much as possible is compressed; the worst of those must fit beside the slots.
    """
    c, per_chunk = cfg.chunk_size, -(-cfg.chunk_size // k)
    if per_chunk >= c:  # k = 1 compresses nothing
        return budget
    most_chunks = (budget - raw_tail - (c - 1)) // per_chunk
    return budget if most_chunks < 0 else max(budget, (most_chunks + 1) * c + raw_tail - 1)


def stable_plan(n_tokens: int, cfg: ExtEmbConfig, k: int | None, raw_tail: int, budget: int) -> CompressionPlan | None:
    """The append-stable layout of an input longer than `budget`, or None beyond the rule's reach.

    k: the given one, or the smallest of the ladder whose `stable_limit` covers the input, so k
    changes only where the total length crosses a band (len(ladder) - 1 times as a conversation
    grows; then every compressed chunk is laid out again at the new k).
    Compressed: the oldest whole chunks, as few as fit. As the input grows that count only rises,
    one chunk when the window overflows (freeing chunk_size - chunk_size/k positions: room for
    the next turns); in between, appended tokens leave every compact slot and every earlier raw
    token at its position. (Compressing more chunks at once was measured: the cap that keeps
    `raw_tail` raw then forces extra moves near the top of a band, and fewer tokens stay raw.)
    """
    c = cfg.chunk_size
    ks = [k] if k is not None else cfg.k_ladder
    k = next((kk for kk in ks if n_tokens <= stable_limit(kk, cfg, raw_tail, budget)), None)
    if k is None:
        return None
    per_chunk = -(-c // k)
    chunks = -(-(n_tokens - budget) // (c - per_chunk))  # each compressed chunk frees c - per_chunk positions
    return CompressionPlan(n_tokens, chunks * c, k, chunks * per_chunk, c, chunk_bounds(chunks * c, c))


def widest_raw_tail(n_tokens: int, raw: int, k: int, chunk_size: int, budget: int) -> int:
    """The longest raw tail (>= `raw`, which fits) for which slots + raw tail <= budget at k.

    One more raw token removes at most one compact slot, so the positions used never fall
    as the raw tail grows: the longest one that fits is found by bisection.
    """
    lo, hi = raw, n_tokens
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if compact_slots(n_tokens - mid, k, chunk_size) + mid <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def max_context_tokens(cfg: ExtEmbConfig, reserve: int | None = None) -> int:
    """The longest input that fits the window at the largest k of the ladder (the extended length)."""
    k = cfg.k_ladder[-1]
    free = cfg.window - cfg.raw_tail - (cfg.reserve if reserve is None else reserve)  # positions left for compact slots
    # every chunk of c tokens takes ceil(c/k) slots: count whole chunks, then a partial one
    per_chunk = -(-cfg.chunk_size // k)
    full = free // per_chunk
    rest_slots = free - full * per_chunk
    return full * cfg.chunk_size + min(rest_slots * k, cfg.chunk_size - 1) + cfg.raw_tail
