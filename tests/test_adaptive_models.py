"""Adaptive methods on the other architecture families the issue names: image classification (ViT) and a CLIP
vision encoder with a head, from pixel_values inputs; and a model without a classification head is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from workers.engine.errors import EngineError
from workers.engine.merge import run_merge
from workers.engine.spec import MergeSpec

IMAGE = 16


def _vit(root: Path) -> tuple[Path, list[Path]]:
    from transformers import ViTConfig, ViTForImageClassification, ViTModel

    config = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  image_size=IMAGE, patch_size=8, num_channels=3)
    base = ViTModel(ViTConfig(**config), add_pooling_layer=False)
    return _family(root, base, lambda k: ViTForImageClassification(ViTConfig(**config, num_labels=2 + k)), "vit")


def _clip(root: Path) -> tuple[Path, list[Path]]:
    from transformers import CLIPConfig, CLIPForImageClassification, CLIPVisionConfig, CLIPVisionModel

    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  image_size=IMAGE, patch_size=8, projection_dim=16)
    base = CLIPVisionModel(CLIPVisionConfig(**vision))

    def expert(k: int):
        config = CLIPConfig(vision_config=vision, text_config=dict(hidden_size=32, num_hidden_layers=1,
                            num_attention_heads=2, intermediate_size=64), num_labels=2 + k)
        return CLIPForImageClassification(config)

    return _family(root, base, expert, "vision_model")


def _family(root: Path, base, make_expert, prefix: str) -> tuple[Path, list[Path]]:
    torch.manual_seed(0)
    base.eval().save_pretrained(root / "base", safe_serialization=True)
    tasks = []
    for k in range(2):
        expert = make_expert(k).eval()
        inner = getattr(expert, prefix)
        base_state = {n.removeprefix(f"{prefix}."): t for n, t in base.state_dict().items()}
        inner.load_state_dict(base_state, strict=False)
        with torch.no_grad():
            for p in inner.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        expert.save_pretrained(root / f"task{k}", safe_serialization=True)
        tasks.append(root / f"task{k}")
    return root / "base", tasks


@pytest.mark.parametrize("build", [_vit, _clip], ids=["vit", "clip_vision"])
def test_image_models_adapt_from_pixel_values(tmp_path, build):
    torch.set_num_threads(1)
    base, tasks = build(tmp_path)
    data = []
    for k in range(len(tasks)):
        path = tmp_path / f"pixels{k}.safetensors"
        save_file({"pixel_values": torch.randn(12, 3, IMAGE, IMAGE)}, str(path))
        data.append(path)
    spec = MergeSpec.model_validate({"method": "adamerging", "base_model": str(base), "parameters": {
        "steps": 4, "batch_size": 4, "lr": 0.05}, "models": [{"model": str(t), "data": str(d)}
                                                           for t, d in zip(tasks, data, strict=True)]})
    out = run_merge(spec, tmp_path / "out").out_dir
    curve = json.loads((out / "loss_curve.json").read_text())["points"]
    assert len(curve) == 4 and all(p["loss"] > 0 for p in curve)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"pixel_values": torch.randn(4, 3, IMAGE * 2, IMAGE * 2)}, str(wrong))
    bad = spec.model_copy(update={"models": [spec.models[0], spec.models[1].model_copy(update={"data": str(wrong)})]})
    with pytest.raises(EngineError) as err:
        run_merge(bad, tmp_path / "bad")
    assert err.value.code.value == "invalid_data" and f"expects [3, {IMAGE}, {IMAGE}]" in err.value.message


def test_a_model_without_a_classification_head_is_refused(tmp_path):
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(tmp_path / "base", safe_serialization=True)
    BertModel(config).save_pretrained(tmp_path / "task", safe_serialization=True)
    data = tmp_path / "ids.safetensors"
    save_file({"input_ids": torch.randint(0, 50, (4, 8))}, str(data))
    spec = MergeSpec.model_validate({"method": "adamerging", "base_model": str(tmp_path / "base"),
                                     "models": [{"model": str(tmp_path / "task"), "data": str(data)}],
                                     "parameters": {"steps": 1}})
    with pytest.raises(EngineError) as err:
        run_merge(spec, tmp_path / "out")
    assert err.value.code.value == "unsupported_model" and "no logits" in err.value.message
