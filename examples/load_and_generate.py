"""Load a finalized directory with transformers, check its logits against the trained model's, and generate
text with the tokenizer that was finalized with it.

python examples/load_and_generate.py DEST RUN_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "trainers"))
import common  # before transformers: it leaves out the import-time messages no user can act on
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging


def main() -> None:
    dest, run = Path(sys.argv[1]), Path(sys.argv[2])
    hf_logging.disable_progress_bar()  # a bar over a model this small only flashes by
    model = AutoModelForCausalLM.from_pretrained(dest).eval()
    ids = common.reference_input()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    same = torch.equal(logits, torch.load(run / "reference_logits.pt"))
    print(f"loaded {type(model).__name__} from {dest}: {sum(p.numel() for p in model.parameters())} parameters")
    print(f"logits identical to the trained model's: {same}")
    tokenizer = AutoTokenizer.from_pretrained(dest)
    prompt = tokenizer("the quick brown fox", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    print(f"greedy generation after 'the quick brown fox': {tokenizer.decode(out[0, prompt.input_ids.shape[1] :])!r}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
