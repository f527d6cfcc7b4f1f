"""The OpenAI request contract both servers keep: `vllm serve` (the plug-in's middleware) and
the Ray app's ingress refuse the same requests with the same words. The field sets come from
vLLM's own request models, so a field vLLM adds is known here too."""

from __future__ import annotations

from .model.config import ContextError, ExtEmbConfig, layout_options

# vLLM reads these off a request with getattr; they are not fields of its request models
# (vllm 0.32.0, entrypoints/serve/engine/protocol.py): they are not unknown.
READ_WITH_GETATTR = frozenset({"mm_processor_kwargs", "media_io_kwargs", "kv_cache_report_mode"})


def request_fields() -> dict[str, frozenset]:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    def names(model):
        fields = model.model_fields
        return frozenset(fields) | {f.alias for f in fields.values() if f.alias} | READ_WITH_GETATTR

    return {"/v1/completions": names(CompletionRequest), "/v1/chat/completions": names(ChatCompletionRequest)}


def check_request(path: str, body, ext: ExtEmbConfig, fields: dict[str, frozenset]) -> str | None:
    """The reason a completion/chat request body is refused, or None. Bodies that are not a JSON
    object are left to vLLM, which answers them itself."""
    if not isinstance(body, dict):
        return None
    unknown = sorted(set(body) - fields[path])
    if unknown:
        return f"unknown field(s) in the request: {unknown}"
    try:
        layout_options(body.get("mm_processor_kwargs"), ext)
    except ContextError as e:
        return str(e)
    return None
