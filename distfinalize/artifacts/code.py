"""Model code for remote-code models (`trust_remote_code=True`): the `*.py` files `auto_map` needs.

What is copied: the top-level modules that `auto_map` in `config.json` or `tokenizer_config.json` at the
source root names (`"modeling_x.XForCausalLM"`), plus the modules those import relatively (`from .rope
import ...`), followed transitively: the same files transformers' dynamic-module loader copies. Without
`auto_map` nothing is copied, so training scripts that sit beside the checkpoint (`train.py`) never land in
the model directory. References to code in another repo (`"org/repo--modeling_x.X"`) need no local file.
Sub-directories are never searched.

Runs on: rank 0.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from distfinalize.errors import DestinationError, SourceError
from distfinalize.hfnames import read_json_object

log = logging.getLogger(__name__)

AUTO_MAP_FILES = ("config.json", "tokenizer_config.json")
# transformers.dynamic_module_utils.get_relative_imports uses these two patterns
_RELATIVE_IMPORTS = (
    re.compile(r"^\s*import\s+\.(\S+)\s*$", re.MULTILINE),
    re.compile(r"^\s*from\s+\.(\S+)\s+import", re.MULTILINE),
)


def model_code_files(source_root: Path, *, warn: bool = True) -> list[Path]:
    """The `*.py` files at `source_root` that `auto_map` needs, sorted by name; [] without `auto_map`.

    A module `auto_map` names but the root lacks is logged as a warning when `warn` (the output will not load
    with `trust_remote_code` until it is added). Runs on: rank 0 (all ranks with `warn=False`: the link check).
    """
    wanted = sorted({module for path in AUTO_MAP_FILES for module in _auto_map_modules(source_root / path)})
    found: dict[str, Path] = {}
    todo = list(wanted)
    while todo:
        module = todo.pop()
        if module in found:
            continue
        path = source_root / f"{module}.py"
        if not path.is_file():
            if not warn:
                continue
            log.warning(
                "auto_map names module %r but %s does not exist; the output will need it for trust_remote_code",
                module,
                path,
            )
            continue
        found[module] = path
        todo.extend(_relative_imports(path))
    return sorted(found.values(), key=lambda p: p.name)


def copy_model_code(files: Sequence[Path], directory: Path) -> list[Path]:
    """Copy each file (content and times, `shutil.copy2`) to `directory/<name>`. Returns the new paths.

    Runs on: rank 0.
    """
    out = []
    for src in files:
        dst = directory / src.name
        try:
            shutil.copy2(src, dst)
        except OSError as exc:
            raise DestinationError("cannot copy model code", where=f"{src} -> {dst}", hint=exc.strerror) from exc
        out.append(dst)
    if out:
        log.info("copied model code: %s", ", ".join(p.name for p in out))
    return out


def _auto_map_modules(path: Path) -> Iterator[str]:
    """Local module names in the `auto_map` of one JSON file (absent file or key: none)."""
    if not path.is_file():
        return
    auto_map = read_json_object(path, SourceError, path.name).get("auto_map") or {}
    if not isinstance(auto_map, dict):
        raise SourceError("auto_map is not a mapping", where=path, hint="it maps Auto classes to 'module.Class'")
    for value in auto_map.values():
        for ref in value if isinstance(value, list) else [value]:
            module = _local_module(ref)
            if module is not None:
                yield module


def _local_module(ref: object) -> str | None:
    """`"modeling_x.XModel"` -> `"modeling_x"`; None for null entries and code in other repos."""
    if not isinstance(ref, str) or "--" in ref or "." not in ref:
        return None
    module = ref.rsplit(".", 1)[0]
    return module if module.isidentifier() else None


def _relative_imports(path: Path) -> set[str]:
    """Top-level sibling modules `path` imports relatively (`from .x import`, `import .x`)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    names = {m.group(1) for pattern in _RELATIVE_IMPORTS for m in pattern.finditer(text)}
    return {name for name in names if name.isidentifier()}
