"""Load a quantized output folder with onnxruntime and generate text.

    python examples/load_and_generate.py OUTPUT_DIR ["prompt"] [--max-new-tokens 20]

``optimum.adaround.load`` returns an ``ORTModelForCausalLM``; it registers the custom-op library when the
model uses it (3-bit / codebook formats) and fixes the KV-head count Optimum misreads for Phi-3.
"""

from __future__ import annotations

import argparse

from transformers import AutoTokenizer

from optimum.adaround import load


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder")
    parser.add_argument("prompt", nargs="?", default="The history of the city begins")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    args = parser.parse_args(argv)

    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    model = load(args.folder)
    inputs = tokenizer(args.prompt, return_tensors="pt")
    output = model.generate(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        max_new_tokens=args.max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    text = tokenizer.decode(output[0], skip_special_tokens=True)
    print(text)
    return text


if __name__ == "__main__":
    main()
