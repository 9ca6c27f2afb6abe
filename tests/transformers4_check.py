"""Load an exported VILA-layout directory the way NVlabs/VILA's code does, under transformers 4.46.

python transformers4_check.py EXPORT PROMPT WORKDIR  (run by tests/transformers4.py in its venv)

Runs without this project installed. Reads WORKDIR/inputs.safetensors (`input_ids`,
`pixel_values`), writes WORKDIR/outputs.safetensors (the LLM's logits, the tower's selected
features, both in float32) and prints one JSON line: the tokenizer as VILA's
`build_llm_and_tokenizer` loads it (class, chat template, prompt ids, media tokens), and what
`from_pretrained` reported for the weights.
"""

import json
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import (
    AutoTokenizer,
    Qwen2ForCausalLM,
    SiglipImageProcessor,
    SiglipVisionModel,
)

MEDIA_TOKENS = ("<vila/sentinel>", "<image>", "<vila/video>")


def loading_problems(info: dict) -> dict:
    return {k: sorted(map(str, v)) for k, v in info.items() if v}


def main() -> None:
    export, prompt, workdir = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    inputs = load_file(workdir / "inputs.safetensors")
    top = json.loads((export / "config.json").read_text())

    # llava/model/language_model/builder.py: the tokenizer of llm/, then the media tokens
    tokenizer = AutoTokenizer.from_pretrained(
        export / "llm", padding_side="right", use_fast=True, legacy=False
    )
    config = json.loads((export / "llm" / "tokenizer_config.json").read_text())
    messages = [{"role": "user", "content": "<vila/video>" + prompt}]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    before = len(tokenizer)
    media = {}
    for token in MEDIA_TOKENS:
        tokenizer.add_tokens([token], special_tokens=True)  # what VILA does: a no-op if present
        token_id = tokenizer.convert_tokens_to_ids(token)
        media[token] = {"id": token_id, "special": tokenizer.added_tokens_decoder[token_id].special}

    llm, llm_info = Qwen2ForCausalLM.from_pretrained(
        export / "llm", torch_dtype=torch.float32, output_loading_info=True
    )
    tower, tower_info = SiglipVisionModel.from_pretrained(
        export / "vision_tower", torch_dtype=torch.float32, output_loading_info=True
    )
    processor = SiglipImageProcessor.from_pretrained(export / "vision_tower")
    projector = load_file(export / "mm_projector" / "model.safetensors")
    with torch.no_grad():
        logits = llm(input_ids=inputs["input_ids"]).logits
        hidden = tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
    features = hidden[top["mm_vision_select_layer"]]
    save_file(
        {"logits": logits, "features": features.contiguous()}, workdir / "outputs.safetensors"
    )
    report = {
        "transformers": transformers.__version__,
        "tokenizer_class": type(tokenizer).__name__,
        "config_tokenizer_class": config.get("tokenizer_class"),
        "inline_chat_template": bool(config.get("chat_template")),
        "prompt_ids": list(prompt_ids),
        "eos_token": tokenizer.eos_token,
        "media": media,
        "grew": len(tokenizer) - before,
        "llm_loading": loading_problems(llm_info),
        "tower_loading": loading_problems(tower_info),
        "image_size": processor.size,
        "projector_tensors": sorted(projector),
        "projector_config": json.loads((export / "mm_projector" / "config.json").read_text()),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
