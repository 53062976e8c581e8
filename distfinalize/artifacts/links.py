"""Files that go from the inputs into DEST stay inside the tree the user gave.

config.json, generation_config.json, the model card (README.md), the model code `auto_map` names,
adapter_config.json and the tokenizer's files are read from the source and land, in some form, in DEST, which
`--push-to-hub` publishes. A symlink among them whose target leaves its tree would publish a file from elsewhere
(a key, another user's file), so it is refused with the link and its target named. The tree of a file is the
outermost user-given root (SRC, the checkpoint folder, --checkpoint, --base-model, --tokenizer) that holds the
dir it was found in; a dir above SRC searched for config.json is its own tree. Links that stay inside the tree
are read like regular files; what DEST gets is always a regular file (written or copied with its content).

Runs on: all ranks (stat calls only, in the prepare step).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from pathlib import Path

from distfinalize.errors import SourceError

# What transformers' AutoTokenizer may read from a tokenizer dir (and save again).
TOKENIZER_PATTERNS = (
    "tokenizer*",
    "*.model",
    "vocab*",
    "merges*",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template*",
    "preprocessor_config.json",
    "processor_config.json",
)
TOKENIZER_SUBDIRS = ("additional_chat_templates",)


def roots(paths: Iterable[Path | None]) -> tuple[Path, ...]:
    """The user-given roots that exist, resolved (a symlinked root is the user's own choice). Pure but for stat."""
    return tuple(dict.fromkeys(p.resolve() for p in paths if p is not None and p.exists()))


def tree_of(directory: Path, given: Sequence[Path]) -> Path:
    """The outermost root holding `directory`; the directory itself when none does."""
    real = directory.resolve()
    holding = [root for root in given if real.is_relative_to(root)]
    return min(holding, key=lambda p: len(p.parts)) if holding else real


def check_inside(path: Path, tree: Path, what: str) -> None:
    """Refuse `path` (SourceError) when it resolves to a place outside `tree`: a symlink (or a symlinked dir on
    its way) leading out of it. A path that does not exist is not checked."""
    if not (path.exists() or path.is_symlink()):
        return
    target = path.resolve()
    if not target.is_relative_to(tree):
        raise SourceError(
            f"{what} is a symlink that leads outside {tree}",
            where=f"{path} -> {target}",
            hint="nothing from outside the inputs is copied into DEST; replace the link with a "
            "regular file (a copy of what DEST should hold)",
        )


def check_files(files: Iterable[tuple[Path, str]], given: Sequence[Path]) -> None:
    """check_inside for each (file, what) against the tree of the dir it was found in."""
    for path, what in files:
        check_inside(path, tree_of(path.parent, given), what)


def tokenizer_files(directory: Path) -> list[Path]:
    """The files of a tokenizer dir that AutoTokenizer may read, symlinks included, sorted."""
    found = [p for p in directory.iterdir() if any(fnmatch.fnmatch(p.name, pat) for pat in TOKENIZER_PATTERNS)]
    for sub in TOKENIZER_SUBDIRS:
        if (directory / sub).is_dir() or (directory / sub).is_symlink():
            found.append(directory / sub)
            if (directory / sub).is_dir():
                found += list((directory / sub).iterdir())
    return sorted(found)


def published_inputs(
    config_path: Path | None, search: Sequence[Path], tokenizer_dir: Path | None
) -> list[tuple[Path, str]]:
    """(file, what it is) of every input whose content goes into DEST: config.json and what sits beside it
    (generation_config.json, README.md, the model code auto_map names), the first adapter_config.json of the
    search dirs, and the tokenizer dir's files. Runs on: all ranks."""
    from distfinalize.artifacts.card import CARD_NAME
    from distfinalize.artifacts.code import model_code_files
    from distfinalize.hfnames import ADAPTER_CONFIG

    out: list[tuple[Path, str]] = []
    if config_path is not None:
        beside = config_path.parent
        out += [
            (config_path, "config.json"),
            (beside / "generation_config.json", "generation_config.json"),
            (beside / CARD_NAME, f"the model card {CARD_NAME}"),
        ]
        out += [(p, "model code named by auto_map") for p in model_code_files(beside, warn=False)]
    adapter = next((d / ADAPTER_CONFIG for d in search if (d / ADAPTER_CONFIG).is_file()), None)
    if adapter is not None:
        out.append((adapter, ADAPTER_CONFIG))
    if tokenizer_dir is not None and tokenizer_dir.is_dir():
        out += [(p, f"the tokenizer file {p.name}") for p in tokenizer_files(tokenizer_dir)]
    return out
