"""Files rank 0 writes once: the index, config.json, and (later) tokenizer, generation config, card."""
