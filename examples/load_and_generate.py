"""Load a finalized directory with transformers, check its logits against the trained model's, and generate.

python examples/load_and_generate.py DEST RUN_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent / "trainers"))
import common


def main() -> None:
    dest, run = Path(sys.argv[1]), Path(sys.argv[2])
    model = AutoModelForCausalLM.from_pretrained(dest).eval()
    ids = common.reference_input()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    same = torch.equal(logits, torch.load(run / "reference_logits.pt"))
    print(f"loaded {type(model).__name__} from {dest}: {sum(p.numel() for p in model.parameters())} parameters")
    print(f"logits identical to the trained model's: {same}")
    out = model.generate(ids[:1, :6], max_new_tokens=10, do_sample=False, pad_token_id=0)
    print(f"greedy generation from token ids {ids[0, :6].tolist()}: {out[0, 6:].tolist()}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
