"""Files rank 0 writes once: index, config.json, generation config, tokenizer, model card, model code, Hub push."""
