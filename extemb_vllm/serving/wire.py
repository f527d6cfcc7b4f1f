"""Messages between processes, as msgspec structs encoded with msgpack.

Tensors travel as raw little-endian bytes with shape and dtype, never as pickles, and
every message is validated on receipt: msgspec checks the types while decoding, and
`__post_init__` checks what types cannot say (sizes that agree, values in range).
A payload that fails either raises `WireError` with what is wrong.
"""

from __future__ import annotations

import hashlib
import math

import msgspec
import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_CHUNKS_PER_REQUEST = 4096


class WireError(ValueError):
    """A payload that is not a valid message: the sender gets this text back."""


class RequestRejected(ValueError):
    """A worker refused the request as the client's fault (its ErrorReply was a bad_request)."""


class Tensor(msgspec.Struct, frozen=True):
    shape: tuple[int, ...]
    dtype: str
    data: bytes
    digest: str  # blake2b-128 of data: a corrupted or truncated payload is refused

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise WireError(f"tensor dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        if any(d < 0 for d in self.shape):
            raise WireError(f"tensor shape {self.shape} has a negative size")
        want = math.prod(self.shape) * DTYPES[self.dtype].itemsize
        if len(self.data) != want:
            raise WireError(f"tensor of shape {self.shape} {self.dtype} needs {want} bytes, got {len(self.data)}")
        if _digest(self.data) != self.digest:
            raise WireError("tensor bytes do not match their digest (corrupted payload)")

    @classmethod
    def from_torch(cls, t: torch.Tensor) -> "Tensor":
        name = next((n for n, d in DTYPES.items() if d == t.dtype), None)
        if name is None:
            raise WireError(f"cannot send a {t.dtype} tensor; use one of {sorted(DTYPES)}")
        t = t.detach().to("cpu").contiguous()
        data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return cls(tuple(t.shape), name, data, _digest(data))

    def to_torch(self) -> torch.Tensor:
        if not self.data:
            return torch.empty(self.shape, dtype=DTYPES[self.dtype])
        flat = torch.frombuffer(bytearray(self.data), dtype=torch.uint8)
        return flat.view(DTYPES[self.dtype]).reshape(self.shape)


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class EncodeRequest(msgspec.Struct, frozen=True):
    """Chunks of token ids to encode independently; each gets its full-resolution output."""

    chunks: list[list[int]]

    def __post_init__(self):
        if not self.chunks:
            raise WireError("an encode request needs at least one chunk")
        if len(self.chunks) > MAX_CHUNKS_PER_REQUEST:
            raise WireError(f"{len(self.chunks)} chunks in one request; at most {MAX_CHUNKS_PER_REQUEST}")
        if any(len(c) == 0 for c in self.chunks):
            raise WireError("cannot encode an empty chunk")
        if any(t < 0 for c in self.chunks for t in c):
            raise WireError("token ids must be >= 0")


class EncodeResult(msgspec.Struct, frozen=True):
    """Full-resolution outputs (len_i, hidden) of each chunk, with each chunk's content key."""

    keys: list[str]
    outputs: list[Tensor]

    def __post_init__(self):
        if len(self.keys) != len(self.outputs):
            raise WireError(f"{len(self.keys)} keys for {len(self.outputs)} outputs")
        if any(len(t.shape) != 2 for t in self.outputs):
            raise WireError("every chunk output must be 2-D (tokens, hidden)")


class GenerateRequest(msgspec.Struct, frozen=True):
    """One generation on an LLM replica: the raw part as tokens, the compressed part as compact
    embeddings made by the embedder workers (None when the input fits the window raw).

    `sampling`, when set, is a vLLM `SamplingParams` in vLLM's own msgpack encoding (what its
    API server sends its engine): every option of an OpenAI request (stop, n, penalties,
    logprobs, response_format, ...) reaches the engine as `vllm serve` would pass it. Without
    it the few fields below make the parameters (callers inside the project, tests)."""

    prompt_token_ids: list[int]
    context: Tensor | None = None
    reserve: int | None = None
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: bool = False
    sampling: bytes | None = None

    def __post_init__(self):
        if not self.prompt_token_ids:
            raise WireError("a generate request needs at least one prompt token")
        if self.context is not None and len(self.context.shape) != 2:
            raise WireError(f"context embeddings must be 2-D (slots, hidden), got shape {self.context.shape}")
        if self.max_tokens < 1:
            raise WireError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not (self.temperature >= 0 and 0 < self.top_p <= 1):
            raise WireError("temperature must be >= 0 and top_p in (0, 1]")


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True):
    token_id: int
    logprob: float
    text: str  # the token as the engine decoded it


class Choice(msgspec.Struct, frozen=True):
    """One of a request's n completions. `logprobs`, when asked for: per generated token, the
    chosen token first, then the most likely ones (as many as asked)."""

    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None
    stop_reason: int | str | None = None
    logprobs: list[list[TokenLogprob]] | None = None


class GenerateResult(msgspec.Struct, frozen=True):
    token_ids: list[int]  # token_ids / text / finish_reason / logprobs: the first choice's
    text: str
    finish_reason: str | None
    prompt_positions: int  # positions the LLM read: compact slots + raw tokens
    logprobs: list[float] | None = None
    choices: list[Choice] = []  # all n choices
    cached_positions: int = 0  # of prompt_positions, served by the replica's prefix cache
    layout: dict[str, int | None] | None = None  # usage.prompt_layout of the request (set by the router)


class GenerateDelta(msgspec.Struct, frozen=True):
    """One streamed step of one choice: its new tokens and text since its previous delta."""

    token_ids: list[int]
    text: str
    finish_reason: str | None
    prompt_positions: int
    index: int = 0
    n_choices: int = 1  # the stream is complete once this many choices have finished
    stop_reason: int | str | None = None
    logprobs: list[list[TokenLogprob]] | None = None
    layout: dict[str, int | None] | None = None  # usage.prompt_layout of the request (set by the router)


class ErrorReply(msgspec.Struct, frozen=True):
    kind: str  # "bad_request" | "not_found" | "internal"
    message: str


_ENCODER = msgspec.msgpack.Encoder()
_DECODERS: dict[type, msgspec.msgpack.Decoder] = {}


def encode(msg: msgspec.Struct) -> bytes:
    return _ENCODER.encode(msg)


def decode_reply(payload: bytes, kind: type, error: type[Exception] = RequestRejected):
    """A worker's reply: a `kind`, or its ErrorReply raised as `error` with the worker's message
    (a reply of another kind than bad_request is the server's fault: RuntimeError)."""
    try:
        return decode(payload, kind)
    except WireError:
        err = decode(payload, ErrorReply)
        raise (error if err.kind == "bad_request" else RuntimeError)(f"{err.kind}: {err.message}") from None


def decode(payload: bytes, kind: type):
    """bytes -> a validated `kind`; anything else raises WireError naming the problem."""
    dec = _DECODERS.setdefault(kind, msgspec.msgpack.Decoder(kind))
    try:
        return dec.decode(payload)
    except WireError:
        raise
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise WireError(f"malformed {kind.__name__} payload: {e}") from None
    except (ValueError, TypeError, OverflowError) as e:  # raised by a struct's __post_init__ check
        raise WireError(f"invalid {kind.__name__}: {e}") from None
