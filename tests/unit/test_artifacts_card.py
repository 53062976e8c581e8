"""The model card: metadata that parses back with huggingface_hub's ModelCard.load, a body that says where the
weights came from, and a source card carried with its metadata merged."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from distfinalize.artifacts.card import SECTION_START, CardInfo, card_preview, write_model_card
from distfinalize.errors import SourceError

FULL = CardInfo(
    source_format="dcp",
    source_path="runs/llama/step-1200",
    step=1200,
    saved_world_size=8,
    dtype="bfloat16",
    quantization="int8-weight-only",
    base_model_id="meta-llama/Llama-3.2-1B",
    datasets=("HuggingFaceH4/ultrachat_200k", "trl-lib/tldr"),
    training_method="sft",
    log_urls=("https://wandb.ai/team/proj/runs/abc", "https://example.org/tb"),
    extra_libraries=("huggingface_hub", "surely-not-an-installed-package"),
)
MINIMAL = CardInfo("deepspeed", "ckpt", None, None, None, None, None)


def dest(tmp_path: Path) -> Path:
    """A staging dir named like the pipeline's: the card must use DEST's own name."""
    out = tmp_path / "my-model.distfinalize-staging"
    out.mkdir()
    return out


def section(text: str, title: str) -> str:
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_new_card_metadata_parses_back_exactly(tmp_path: Path) -> None:
    path = write_model_card(dest(tmp_path), FULL)
    assert path == tmp_path / "my-model.distfinalize-staging" / "README.md"
    expected = {
        "base_model": "meta-llama/Llama-3.2-1B",
        "datasets": ["HuggingFaceH4/ultrachat_200k", "trl-lib/tldr"],
        "library_name": "transformers",
        "tags": ["distfinalize", "sft"],
        "pipeline_tag": "text-generation",
    }
    assert ModelCard.load(path).data.to_dict() == expected
    assert card_preview(FULL) == expected


def test_body_names_source_weights_versions_logs_and_loading(tmp_path: Path) -> None:
    text = ModelCard.load(write_model_card(dest(tmp_path), FULL)).text
    assert text.startswith("\n# my-model\n")
    source = section(text, "Source checkpoint")
    assert "- Format: dcp" in source
    assert "- Path: `runs/llama/step-1200`" in source
    assert "- Step: 1200" in source
    assert "- Saved with world size: 8" in source
    weights = section(text, "Weights")
    assert "- dtype: bfloat16" in weights
    assert "- Quantization: int8-weight-only" in weights
    versions = dict(re.findall(r"^\| (\S+) \| (\S+) \|$", section(text, "Library versions"), re.MULTILINE))
    assert versions == {
        "Library": "Version",
        "torch": metadata.version("torch"),
        "transformers": metadata.version("transformers"),
        "safetensors": metadata.version("safetensors"),
        "huggingface_hub": metadata.version("huggingface_hub"),  # an installed extra is listed, a missing one not
    }
    logs = section(text, "Training logs")
    assert logs.split() == ["-", "<https://wandb.ai/team/proj/runs/abc>", "-", "<https://example.org/tb>"]
    snippet = section(text, "How to load").split("```python\n", 1)[1].split("```", 1)[0]
    ast.parse(snippet)  # valid Python
    assert 'AutoModelForCausalLM.from_pretrained("my-model")' in snippet
    assert 'AutoTokenizer.from_pretrained("my-model")' in snippet


def test_model_name_is_the_title_and_load_id(tmp_path: Path) -> None:
    info = CardInfo("dcp", "x", 1, 2, "float32", None, None, model_name="alice/tiny-sft")
    text = write_model_card(dest(tmp_path), info).read_text()
    assert "\n# alice/tiny-sft\n" in text
    assert 'AutoModelForCausalLM.from_pretrained("alice/tiny-sft")' in text


def test_minimal_card_omits_what_was_not_given(tmp_path: Path) -> None:
    card = ModelCard.load(write_model_card(dest(tmp_path), MINIMAL))
    assert card.data.to_dict() == {
        "library_name": "transformers",
        "tags": ["distfinalize"],
        "pipeline_tag": "text-generation",
    }
    assert "- Step: unknown" in card.text
    assert "- Saved with world size: unknown" in card.text
    assert "- dtype: as stored" in card.text
    assert "- Quantization: none" in card.text
    assert "## Training logs" not in card.text
    assert "Base model:" not in card.text


def test_existing_card_body_kept_and_metadata_merged(tmp_path: Path) -> None:
    existing = tmp_path / "source-README.md"
    body = "# Tiny SFT\n\nTrained on my laptop.\n\n## Evaluation\n\n| task | score |\n|---|---|\n| x | 1 |\n"
    existing.write_text(
        "---\nlicense: apache-2.0\nlanguage:\n- en\ndatasets: trl-lib/tldr\ntags:\n- sft\n- llama\n"
        "pipeline_tag: text-generation\n---\n" + body
    )
    expected = {
        "base_model": "meta-llama/Llama-3.2-1B",
        "datasets": ["trl-lib/tldr", "HuggingFaceH4/ultrachat_200k"],
        "language": ["en"],
        "library_name": "transformers",
        "license": "apache-2.0",
        "pipeline_tag": "text-generation",
        "tags": ["sft", "llama", "distfinalize"],
    }
    assert card_preview(FULL, existing) == expected
    card = ModelCard.load(write_model_card(dest(tmp_path), FULL, existing))
    assert card.data.to_dict() == expected
    assert card.text.startswith(body)
    assert card.text.count(SECTION_START) == 1
    assert "- Format: dcp" in card.text
    assert existing.read_text().endswith(body)  # the source card is only read


def test_existing_base_model_kept_when_none_given(tmp_path: Path) -> None:
    existing = tmp_path / "README.md"
    existing.write_text("---\nbase_model: Qwen/Qwen2.5-0.5B\n---\nhello\n")
    card = ModelCard.load(write_model_card(dest(tmp_path), MINIMAL, existing))
    assert card.data.base_model == "Qwen/Qwen2.5-0.5B"
    assert card.text.startswith("hello\n")


def test_finalizing_a_finalized_card_replaces_our_section(tmp_path: Path) -> None:
    first = write_model_card(dest(tmp_path), FULL)
    again = tmp_path / "again"
    again.mkdir()
    info = CardInfo("dcp", "runs/llama/step-2400", 2400, 8, "bfloat16", None, None, training_method="dpo")
    card = ModelCard.load(write_model_card(again, info, first))
    assert card.text.count(SECTION_START) == 1
    assert "- Step: 2400" in card.text
    assert "- Step: 1200" not in card.text
    assert card.data.tags == ["distfinalize", "sft", "dpo"]


def test_card_without_metadata_block_is_carried(tmp_path: Path) -> None:
    existing = tmp_path / "README.md"
    existing.write_text("# Notes\n\nplain markdown\n")
    card = ModelCard.load(write_model_card(dest(tmp_path), MINIMAL, existing))
    assert card.text.startswith("# Notes\n\nplain markdown\n")
    assert card.data.tags == ["distfinalize"]


@pytest.mark.parametrize("header", ["key: [unclosed\n", "- a list\n- not a mapping\n"])
def test_malformed_source_card_is_a_source_error(tmp_path: Path, header: str) -> None:
    existing = tmp_path / "README.md"
    existing.write_text(f"---\n{header}---\nbody\n")
    with pytest.raises(SourceError, match="malformed metadata") as info:
        write_model_card(dest(tmp_path), MINIMAL, existing)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "my-model.distfinalize-staging" / "README.md").exists()


@pytest.mark.parametrize("info", [FULL, MINIMAL], ids=["full", "minimal"])
def test_new_card_is_what_modelcard_writes(tmp_path: Path, info: CardInfo) -> None:
    text = write_model_card(dest(tmp_path), info).read_text(encoding="utf-8")
    assert ModelCard(text).content == text


def test_new_card_leaves_the_hub_client_unloaded(tmp_path: Path) -> None:
    """Rank 0 writes the card while the other ranks wait: huggingface_hub.repocard loads the Hub client."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from distfinalize.artifacts.card import CardInfo, write_model_card\n"
        f"write_model_card(Path({str(dest(tmp_path))!r}), CardInfo('dcp', 'ckpt', 1, 2, 'bfloat16', None, None))\n"
        "print(sorted(m for m in sys.modules if m in ('huggingface_hub.repocard', 'huggingface_hub.hf_api')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"
    assert (tmp_path / "my-model.distfinalize-staging" / "README.md").is_file()
