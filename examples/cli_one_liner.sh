#!/usr/bin/env bash
# Export a Hugging Face causal LM to ONNX and quantize its weights to 4 bits in one command.
#
#   examples/cli_one_liner.sh MODEL_DIR_OR_HUB_ID OUTPUT_DIR
#
# Environment knobs (defaults in brackets): METHOD [gptq], BITS [4], GROUP [128], CALIB_SAMPLES [128],
# SEQ_LEN [512], FORMAT [auto: MatMulNBits where it runs the scheme, else our op], EVAL_TOKENS [all of the
# evaluation text]. The output folder is ready to publish: model.onnx, config and tokenizer files,
# quantization_config.json, quantization_recipe.yaml and a README.md model card with the measured
# perplexity before/after (--eval).
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 MODEL_DIR_OR_HUB_ID OUTPUT_DIR" >&2
    exit 2
fi

optimum-cli export onnx-quant \
    --model "$1" \
    --task text-generation-with-past \
    --weight-bits "${BITS:-4}" --group-size "${GROUP:-128}" --sym \
    --method "${METHOD:-gptq}" \
    --format "${FORMAT:-auto}" \
    --calib-samples "${CALIB_SAMPLES:-128}" --seq-len "${SEQ_LEN:-512}" \
    --eval ${EVAL_TOKENS:+--eval-tokens "$EVAL_TOKENS"} \
    --overwrite \
    "$2"
