"""Which files of a checkpoint folder hold its weights: one rule for local folders (the engine) and object
storage listings (the service), torch-free."""

from __future__ import annotations

import json
from collections.abc import Callable

from workers.engine.errors import EngineError, ErrorCode

INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
CONVERT_HINT = (
    "Convert it once, in an environment you trust, with: python -c \"from transformers import AutoModel; "
    "AutoModel.from_pretrained('IN').save_pretrained('OUT', safe_serialization=True)\""
)


def unsafe(where: str) -> EngineError:
    return EngineError(
        ErrorCode.UNSAFE_FORMAT,
        f"{where}: pickle checkpoints (.bin, .pt, .pth, .ckpt) are refused because loading them runs arbitrary "
        f"code. {CONVERT_HINT}",
        {"file": where},
    )


def is_pickle(name: str) -> bool:
    return name.endswith(PICKLE_SUFFIXES)


def choose_weight_files(where: str, names: set[str], read_text: Callable[[str], str]) -> list[str]:
    """The safetensors files of the folder `where` holding `names` (top level), refusing pickles and adapters
    with a reason. `read_text(name)` reads a small file of the folder (the shard index)."""
    if "adapter_config.json" in names:
        raise EngineError(ErrorCode.INVALID_CHECKPOINT, f"{where}: this is a LoRA/PEFT adapter, not a full model; "
                          "merge the adapter into its base first (peft: merge_and_unload)", {"path": where})
    if INDEX_FILE in names:
        try:
            weight_map = json.loads(read_text(INDEX_FILE))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise EngineError(ErrorCode.INVALID_CHECKPOINT, f"{where}/{INDEX_FILE}: not a valid index ({exc})",
                              {"file": f"{where}/{INDEX_FILE}"}) from None
        missing = [s for s in shards if s not in names]
        if missing:
            raise EngineError(ErrorCode.INPUT_NOT_FOUND, f"{where}/{INDEX_FILE} names shards that are missing: "
                              f"{', '.join(missing)}", {"missing": missing})
        return shards
    if "model.safetensors" in names:
        return ["model.safetensors"]
    found = sorted(n for n in names if n.endswith(".safetensors"))
    if len(found) == 1:
        return found
    if found:
        raise EngineError(ErrorCode.INVALID_CHECKPOINT, f"{where}: several .safetensors files and no {INDEX_FILE}; "
                          "which are the weights?", {"files": found})
    pickles = sorted(n for n in names if is_pickle(n))
    if pickles:
        raise unsafe(f"{where}/{pickles[0]}")
    raise EngineError(ErrorCode.INPUT_NOT_FOUND, f"{where}: no model.safetensors, {INDEX_FILE} or .safetensors file "
                      "in this folder", {"path": where})
