"""Build a tiny, randomly initialised LightOnOCR checkpoint, fully offline.

The real LightOnOCR-2-1B weights are ~2 GB and need the network; tests and
benchmarks only need something that loads through the *real* transformers
classes (`LightOnOcrForConditionalGeneration`, `LightOnOcrProcessor`) and runs
a real `generate`. This module writes such a checkpoint (~1 MB) in a couple of
seconds: same architecture family (Pixtral vision encoder + Qwen3 decoder),
same special tokens, chat template, image preprocessing and generation
defaults as the real model, but a tiny in-memory-trained byte-level BPE
vocabulary and ~300k random weights. Its output is gibberish, but
text-like gibberish, and every code path (batching, padding, eos handling,
decoding) is exercised for real. The same directory is meant to be servable
by `vllm serve` through vLLM's transformers backend, which is why the processor
config carries the image/break/end tokens.

Run `python -m tests.support.tiny_checkpoint DIR` to build one by hand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    LightOnOcrConfig,
    LightOnOcrForConditionalGeneration,
    LightOnOcrProcessor,
    PixtralImageProcessorPil,
    Qwen2Tokenizer,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_PRETOKENIZE_REGEX

__all__ = ["build_tiny_checkpoint"]

SEED = 1234
VOCAB_SIZE = 1000
PATCH_SIZE = 14
SPATIAL_MERGE_SIZE = 2
LONGEST_EDGE = 1540

ENDOFTEXT = "<|endoftext|>"  # pad token, and second eos
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"  # eos
IMAGE_TOKEN = "<|image_pad|>"
IMAGE_BREAK_TOKEN = "<|vision_pad|>"
IMAGE_END_TOKEN = "<|vision_end|>"
# Same relative order as the real Qwen2 vocabulary; they get ids 0..5 here.
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, IMAGE_END_TOKEN, IMAGE_BREAK_TOKEN, IMAGE_TOKEN]

# Renders `[{"role": "user", "content": [{"type": "image"}]}]` with a generation prompt as
# "<|im_start|>system<|im_end|>\n<|im_start|>user\n<|image_pad|><|im_end|>\n<|im_start|>assistant\n",
# like the real model's template (empty system turn unless one is given).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content -%}"
    "{{- '<|image_pad|>' -}}"
    "{%- elif 'text' in content -%}"
    "{{- content['text'] + '\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

# A little English, markdown and digits: enough for the BPE merges to produce
# word-like pieces, so random generations decode to text-like strings.
_CORPUS_LINES = [
    "# Annual Report 2024",
    "## 1. Introduction",
    "The quick brown fox jumps over the lazy dog.",
    "This document describes the results of the year and the plans for the next one.",
    "Revenue grew by 12.5% to 3,450,000 EUR, while costs were stable at 1,200,000 EUR.",
    "- First item of the list",
    "- Second item, with **bold** text and *italic* text",
    "1. Open the file.",
    "2. Read the table below.",
    "3. Write the summary in the report.",
    "| Name | Quantity | Price |",
    "|------|----------|-------|",
    "| Apples | 10 | 2.50 |",
    "| Oranges | 25 | 4.75 |",
    "| Total | 35 | 7.25 |",
    "Invoice number 00123456, dated 2024-03-15, due on 2024-04-15.",
    "Phone: +33 1 23 45 67 89. Email: contact@example.com",
    "The model reads the page and writes the text in natural reading order.",
    "Tables, forms, receipts and multi-column layouts are all common in documents.",
    "Mathematical notation such as $x^2 + y^2 = z^2$ also appears in scientific papers.",
    "> Note: all amounts are given in thousands of euros.",
    "See section 3.2 on page 14 for more details about the method.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100 250 1000 2024 2025",
    "January February March April May June July August September October November December",
    "Monday Tuesday Wednesday Thursday Friday Saturday Sunday",
    "The committee met on the first day of the month to discuss the budget and the schedule.",
    "In conclusion, the project was completed on time and within the planned budget.",
    "### Results and discussion",
    "Figure 2 shows the distribution of values measured between 2019 and 2023.",
    "The temperature was recorded every hour; the average was 21.4 degrees.",
    "Customer: John Smith, 42 Baker Street, London, United Kingdom.",
    "Subtotal 118.00, tax 23.60, total amount due 141.60 (payment by card).",
    "Please sign and return the form before the end of the week.",
    "Chapter 7: How to read a document from top to bottom and from left to right.",
    "The library is open from 9:00 to 18:30, except on public holidays.",
    "Question 4. Explain why the sum of two even numbers is always even.",
    "Answer: let a = 2m and b = 2n, then a + b = 2(m + n), which is even.",
    "Table 3 lists the number of pages, words and characters for each file.",
    "Abstract. We present a simple and efficient approach to optical character recognition.",
    "Keywords: documents, scanning, layout, text extraction, evaluation.",
    "[Link to the website](https://www.example.org/about) and `inline code` samples.",
    "```python",
    'print("hello world")',
    "```",
    "The meeting was moved from Thursday morning to Friday afternoon at 3 pm.",
    "Water, electricity and heating are included in the monthly rent of 850 EUR.",
    "Dear Sir or Madam, thank you for your letter of 12 May regarding your account.",
    "Yours sincerely, the customer service team.",
    "Patient name, date of birth and insurance number must be written in capital letters.",
    "The train leaves the central station at 07:45 and arrives in Paris at 11:20.",
    "Ingredients: flour, sugar, butter, eggs, milk and a pinch of salt.",
    "Article 12 - The parties agree to settle any dispute by mutual agreement.",
    "Footnote 3: the survey was conducted with 1,024 participants in five countries.",
    "Weather forecast: cloudy in the north, sunny in the south, light wind from the west.",
    "Balance sheet, income statement and cash flow statement are shown in the appendix.",
    "Serial number: XK-2049-B, model: Printer 300, warranty: two years.",
]


# Byte-level symbols of printable ASCII plus space, newline and tab ("Ġ", "Ċ", "ĉ" in GPT-2's
# byte-to-unicode map). Leaving the other bytes out of the vocabulary means random generations
# never decode to control characters or broken UTF-8 ("�"); the price is that non-ASCII input
# text is dropped when encoded, which is fine since prompts are only special tokens and ASCII.
_ASCII_ALPHABET = [chr(code) for code in range(33, 127)] + ["Ġ", "Ċ", "ĉ"]


def _train_tokenizer() -> Tokenizer:
    """Train a small byte-level BPE with Qwen2's normaliser, split regex and decoder."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=_ASCII_ALPHABET,
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS_LINES * 8, trainer=trainer)
    return tokenizer


def _build_tokenizer() -> Qwen2Tokenizer:
    """Wrap the trained BPE as the same tokenizer class, specials and template as the real model."""
    bpe = json.loads(_train_tokenizer().to_str())["model"]
    merges = [(left, right) for left, right in bpe["merges"]]
    return Qwen2Tokenizer(
        vocab=bpe["vocab"],
        merges=merges,  # type: ignore[arg-type]  # annotated list[str], but the BPE model wants pairs
        unk_token=None,  # type: ignore[arg-type]  # the real checkpoint has none: byte-level BPE never needs it
        bos_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        # Kept whole by the tokenizer and dropped by `skip_special_tokens`, as in the real vocabulary.
        extra_special_tokens=[IM_START, IMAGE_END_TOKEN, IMAGE_BREAK_TOKEN, IMAGE_TOKEN],
        # Named model-specific tokens: LightOnOcrProcessor reads `tokenizer.image_token` & co.
        image_token=IMAGE_TOKEN,
        image_break_token=IMAGE_BREAK_TOKEN,
        image_end_token=IMAGE_END_TOKEN,
        model_max_length=131072,
        chat_template=CHAT_TEMPLATE,
    )


def _build_config(tokenizer: Qwen2Tokenizer) -> LightOnOcrConfig:
    """A 2-layer, 64-wide Pixtral + Qwen3; head_dim 32 because vLLM's CPU attention rejects 16."""
    vocab_size = len(tokenizer)
    return LightOnOcrConfig(
        spatial_merge_size=SPATIAL_MERGE_SIZE,
        image_token_id=tokenizer.image_token_id,
        tie_word_embeddings=True,
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "head_dim": 32,
            "hidden_act": "silu",
            "image_size": LONGEST_EDGE,
            "patch_size": PATCH_SIZE,
            "num_channels": 3,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        },
        text_config={
            "model_type": "qwen3",
            "vocab_size": vocab_size,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "hidden_act": "silu",
            "max_position_embeddings": 40960,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
            "tie_word_embeddings": True,
            "bos_token_id": None,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
    )


def _build_generation_config(tokenizer: Qwen2Tokenizer) -> GenerationConfig:
    """The real model's sampling defaults, with this vocabulary's ids."""
    return GenerationConfig.from_dict(
        {
            "do_sample": True,
            "temperature": 0.2,
            "top_p": 0.9,
            "top_k": 0,
            "eos_token_id": [tokenizer.eos_token_id, tokenizer.pad_token_id],
            "pad_token_id": tokenizer.pad_token_id,
        }
    )


def _add_image_tokens_to_processor_config(path: Path) -> None:
    """Record the image tokens in processor_config.json, as the real checkpoint does.

    transformers reads them from the tokenizer, but other loaders (vLLM) look here.
    """
    config = json.loads(path.read_text(encoding="utf-8"))
    config.update(
        image_token=IMAGE_TOKEN,
        image_break_token=IMAGE_BREAK_TOKEN,
        image_end_token=IMAGE_END_TOKEN,
    )
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _record_name(path: Path, name: str) -> None:
    """Put the checkpoint's name in config.json (`_name_or_path`), where the service's profile lookup
    reads it for a directory whose own name says nothing (app/profiles.py)."""
    config = json.loads(path.read_text(encoding="utf-8"))
    config["_name_or_path"] = name
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build_tiny_checkpoint(target: Path, name: str = "lightonai/LightOnOCR-2-1B") -> Path:
    """Write a tiny LightOnOCR checkpoint (model, processor, generation config) into `target`.

    `name` is recorded in its config.json: the profile the service picks for it (LightOnOCR-2-1B).
    """
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)

    tokenizer = _build_tokenizer()
    image_processor = PixtralImageProcessorPil(
        size={"longest_edge": LONGEST_EDGE},
        patch_size=PATCH_SIZE,
    )
    processor = LightOnOcrProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        spatial_merge_size=SPATIAL_MERGE_SIZE,
        chat_template=CHAT_TEMPLATE,
    )

    with torch.random.fork_rng(devices=[]):  # deterministic weights, caller's RNG untouched
        torch.manual_seed(SEED)
        model = LightOnOcrForConditionalGeneration(_build_config(tokenizer))
    model.generation_config = _build_generation_config(tokenizer)

    model.save_pretrained(target)
    processor.save_pretrained(target)
    _add_image_tokens_to_processor_config(target / "processor_config.json")
    _record_name(target / "config.json", name)
    return target


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.support.tiny_checkpoint TARGET_DIR")
    print(build_tiny_checkpoint(Path(sys.argv[1])))


# ----------------------------------------------------------------------------- Qwen3.5-VL (LightOnOCR-3 0.8B / 4B)

QWEN_SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, "<|vision_start|>", IMAGE_END_TOKEN, IMAGE_TOKEN, "<|video_pad|>"]
# Qwen3.5's template, reduced to what the service sends: an image (between vision start/end), an optional
# text part, and the thinking switch: `enable_thinking=False` opens and closes an empty think block.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}"
    "{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in content -%}{{- content['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- else -%}{{- '<think>\\n' -}}{%- endif -%}{%- endif -%}"
)


def build_tiny_qwen3_5_checkpoint(target: Path, name: str = "lightonai/LightOnOCR-3-4B") -> Path:
    """A tiny random `Qwen3_5ForConditionalGeneration` (linear + full attention layers, Qwen3.5 vision).

    The model, tokenizer, image processor (patch 16, merge 2, up to 2048 px) and chat template are
    written one by one. The processor object itself (Qwen3VLProcessor) is also saved when it can be
    built: in transformers 5.2x that needs torchvision for its video half.
    """
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    global SPECIAL_TOKENS
    saved, SPECIAL_TOKENS = SPECIAL_TOKENS, QWEN_SPECIAL_TOKENS
    try:
        bpe = json.loads(_train_tokenizer().to_str())["model"]
    finally:
        SPECIAL_TOKENS = saved
    tokenizer = Qwen2Tokenizer(
        vocab=bpe["vocab"],
        merges=[(left, right) for left, right in bpe["merges"]],  # type: ignore[misc]
        unk_token=None,  # type: ignore[arg-type]
        bos_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens=[IM_START, "<|vision_start|>", IMAGE_END_TOKEN, IMAGE_TOKEN, "<|video_pad|>"],
        model_max_length=131072,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    ids = {token: int(tokenizer.convert_tokens_to_ids(token)) for token in QWEN_SPECIAL_TOKENS}  # type: ignore[arg-type]
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=16, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 32 * 32, "longest_edge": 2048 * 2048}
    )
    config = Qwen3_5Config(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "linear_key_head_dim": 16,
            "linear_value_head_dim": 16,
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 2,
            "layer_types": ["linear_attention", "full_attention"],
            "max_position_embeddings": 40960,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000000.0,
                "mrope_section": [2, 1, 1],
                "mrope_interleaved": True,
                "partial_rotary_factor": 0.25,
            },
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "tie_word_embeddings": True,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 2,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": 64,
            "num_position_embeddings": 256,
        },
        image_token_id=ids[IMAGE_TOKEN],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids[IMAGE_END_TOKEN],
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = Qwen3_5ForConditionalGeneration(config)
    model.generation_config = _build_generation_config(tokenizer)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    image_processor.save_pretrained(target)
    try:
        from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

        processor = Qwen3VLProcessor(  # type: ignore[no-untyped-call]
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=Qwen3VLVideoProcessor(),
            chat_template=QWEN_CHAT_TEMPLATE,
        )
        processor.save_pretrained(target)
    except (ImportError, AttributeError):  # no torchvision: the processor cannot be built here
        pass
    _record_name(target / "config.json", name)
    return target
