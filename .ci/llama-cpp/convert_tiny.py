"""Convert the tiny LightOnOCR test checkpoint to GGUF (text model + mmproj) with llama.cpp's own converter.

Runs in the converter's virtualenv (made by .ci/llama-server), never in the project's:

    python convert_tiny.py LLAMA_CPP_TREE CHECKPOINT_DIR OUT_DIR

Writes OUT_DIR/tiny-lightonocr-f32.gguf and OUT_DIR/mmproj-tiny-lightonocr-f32.gguf. Three adjustments, each
because the checkpoint is tiny or saved by transformers, not because llama.cpp's LightOnOCR support differs:

- config.json is rewritten to the Hub checkpoint's layout (`architectures: ["LightOnOCRForConditionalGeneration"]`,
  `model_type: "mistral3"`, text_config `Qwen3ForCausalLM`): the converter registers LightOnOCR under that name,
  and transformers 5 saves `LightOnOcrForConditionalGeneration` / `lighton_ocr`. Tensor names are the same.
- the tokenizer's pre-tokenizer is declared `qwen2`: the converter recognises a pre-tokenizer by hashing how it
  tokenises a test text, which a 1,000-token vocabulary never matches; the tiny tokenizer's split regex is Qwen2's.
- the projector's tensor map gets at least 3 blocks: the converter maps `multi_modal_projector.linear_{1,2}` with
  the vision encoder's block count (24 in the real model), and the tiny encoder has 2 layers.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path


def hub_layout(checkpoint: Path, work: Path) -> Path:
    target = work / "checkpoint"
    shutil.copytree(checkpoint, target)
    config = json.loads((target / "config.json").read_text())
    config.update(
        architectures=["LightOnOCRForConditionalGeneration"],
        model_type="mistral3",
        image_token_index=config["image_token_id"],
        projector_hidden_act="gelu",
        multimodal_projector_bias=False,
        vision_feature_layer=-1,
    )
    config["text_config"]["architectures"] = ["Qwen3ForCausalLM"]
    (target / "config.json").write_text(json.dumps(config, indent=1))
    return target


def main() -> None:
    tree, checkpoint, out = (Path(arg).resolve() for arg in sys.argv[1:4])
    sys.path[:0] = [str(tree), str(tree / "gguf-py")]  # the tree's own gguf-py: PyPI's gguf lags behind it
    import convert_hf_to_gguf  # type: ignore[import-not-found]
    import gguf  # type: ignore[import-not-found]
    from conversion import base  # type: ignore[import-not-found]

    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
    original_map = gguf.get_tensor_name_map

    def tensor_map(arch: object, n_blocks: int) -> object:
        return original_map(arch, max(n_blocks, 3) if arch == gguf.MODEL_ARCH.MMPROJ else n_blocks)

    gguf.get_tensor_name_map = tensor_map
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        model = hub_layout(checkpoint, Path(work))
        for extra, name in (([], "tiny-lightonocr-f32.gguf"), (["--mmproj"], "mmproj-tiny-lightonocr-f32.gguf")):
            sys.argv = ["convert_hf_to_gguf.py", str(model), *extra, "--outtype", "f32", "--outfile", str(out / name)]
            convert_hf_to_gguf.main()
    print(out / "tiny-lightonocr-f32.gguf")
    print(out / "mmproj-tiny-lightonocr-f32.gguf")


if __name__ == "__main__":
    main()
