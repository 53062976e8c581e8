"""The tokenizer: found, extended with added tokens, given a chat template, saved through transformers.

`--add-tokens YAML` (the format Forgather's vocabulary tool reads):

    pad_token: "<|pad|>"                 # a role token: string, or a mapping:
    eos_token: {token: "<|im_end|>", init: "copy:</s>", if_missing: false}
    special_tokens: ["<|im_start|>", {token: "<tool>", init: zero}]
    regular_tokens: ["newword"]

`init` is `zero`, `mean` (the default; PAD defaults to zero) or `copy:TOKEN` (TOKEN's row, by string or id).
`if_missing: true` sets a role token only when the tokenizer has none. Tokens already in the vocabulary
keep their rows. Runs on: rank 0 (the outcome is shared with every rank as plain data).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from distfinalize.errors import SourceError, UsageError
from distfinalize.hfnames import read_json_object
from distfinalize.transform.vocab import RowInit

log = logging.getLogger(__name__)

ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")
ROLE_DEFAULT_INIT = {"pad_token": "zero"}
DEFAULT_PAD = {"pad_token": {"token": "<|pad|>", "init": "zero", "if_missing": True}}
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json")
TOKENIZER_JSON_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.json")


@dataclass(frozen=True)
class TokenRequest:
    """One token to add or assign: its text, role (bos/eos/pad/unk or None), init and flags."""

    token: str
    role: str | None = None
    init: str = "mean"
    special: bool = True
    if_missing: bool = False


@dataclass(frozen=True)
class TokenizerOutcome:
    """What every rank needs to know about the final tokenizer."""

    path: Path | None
    length: int  # len(tokenizer): ids 0..length-1 exist
    added: tuple[tuple[str, int], ...] = ()
    row_inits: tuple[RowInit, ...] = ()
    special_ids: Mapping[str, int | None] = field(default_factory=dict)  # bos/eos/pad_token_id
    has_chat_template: bool = False
    vocab: Mapping[str, int] = field(default_factory=dict, repr=False)  # for stop-token lookup

    def token_id(self, token: str) -> int | None:
        return self.vocab.get(token)


@dataclass(frozen=True)
class FinalTokenizer:
    """The tokenizer step's result: the outcome every rank needs, and on rank 0 the tokenizer object itself,
    saved at the commit. Sent to the other ranks without the object and the vocabulary (they can be large, and
    the other ranks never use them)."""

    outcome: TokenizerOutcome
    tokenizer: Any = None

    def __getstate__(self) -> dict[str, Any]:  # the vocabulary too: only rank 0 looks tokens up
        return {"outcome": replace(self.outcome, vocab={}), "tokenizer": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        object.__setattr__(self, "outcome", state["outcome"])
        object.__setattr__(self, "tokenizer", state["tokenizer"])


def is_tokenizer_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in TOKENIZER_FILES)


def parse_token_requests(path: Path) -> tuple[TokenRequest, ...]:
    """Read an --add-tokens YAML file. Raises UsageError naming the file and the bad entry."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError("cannot read --add-tokens file", where=path, hint=str(exc).splitlines()[0]) from exc
    if not isinstance(data, dict):
        raise UsageError(
            "--add-tokens file must be a YAML mapping",
            where=path,
            hint="keys: bos_token, eos_token, pad_token, unk_token, special_tokens, regular_tokens",
        )
    return token_requests(data, path)


def token_requests(data: Mapping[str, object], where: object = "--add-tokens") -> tuple[TokenRequest, ...]:
    """Token requests from the parsed YAML mapping (see the module docstring)."""
    unknown = set(data) - {*ROLES, "special_tokens", "regular_tokens"}
    if unknown:
        raise UsageError(
            f"unknown key(s) {sorted(unknown)} in --add-tokens",
            where=where,
            hint="use bos_token, eos_token, pad_token, unk_token, special_tokens, regular_tokens",
        )
    out = []
    for role in ROLES:
        if role in data:
            out.append(_request(data[role], where, role=role, special=True))
    for key, special in (("special_tokens", True), ("regular_tokens", False)):
        entries = data.get(key) or []
        if not isinstance(entries, list):
            raise UsageError(f"{key} must be a list", where=where)
        out += [_request(e, where, role=None, special=special) for e in entries]
    return tuple(out)


def _request(entry: object, where: object, *, role: str | None, special: bool) -> TokenRequest:
    default_init = ROLE_DEFAULT_INIT.get(role or "", "mean")
    if isinstance(entry, str):
        return TokenRequest(entry, role, default_init, special)
    if isinstance(entry, dict) and isinstance(entry.get("token"), str):
        init = str(entry.get("init", default_init))
        if init not in ("zero", "mean") and not init.startswith("copy:"):
            raise UsageError(f"init {init!r} of token {entry['token']!r} is not zero, mean or copy:TOKEN", where=where)
        return TokenRequest(entry["token"], role, init, special, bool(entry.get("if_missing", False)))
    raise UsageError(
        f"bad token entry {entry!r}", where=where, hint="a token is a string or a mapping with token, init, if_missing"
    )


def load_tokenizer(path: Path):
    """AutoTokenizer from a local dir; SourceError when transformers cannot read it, or when one of its JSON
    files does not parse (named, with the JSON error's line and column)."""
    from transformers import AutoTokenizer

    for name in TOKENIZER_JSON_FILES:
        if (path / name).is_file():
            read_json_object(path / name, SourceError, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SourceError(
            "transformers cannot load the tokenizer", where=path, hint=str(exc).splitlines()[0] if str(exc) else None
        ) from exc


def apply_requests(tokenizer, requests: Sequence[TokenRequest]) -> tuple[list[tuple[str, int]], list[RowInit]]:
    """Add/assign the requested tokens on `tokenizer`. Returns (added tokens with ids, row inits)."""
    from tokenizers import AddedToken

    added: list[tuple[str, int]] = []
    inits: dict[str, str] = {}
    for req in requests:
        if req.role and req.if_missing and getattr(tokenizer, req.role, None) is not None:
            log.info("%s is already %r; keeping it (if_missing)", req.role, getattr(tokenizer, req.role))
            continue
        if req.token not in tokenizer.get_vocab():
            tokenizer.add_tokens(
                [AddedToken(req.token, special=req.special, normalized=not req.special)], special_tokens=req.special
            )
            added.append((req.token, tokenizer.convert_tokens_to_ids(req.token)))
            inits[req.token] = req.init
        if req.role:
            setattr(tokenizer, req.role, req.token)
    row_inits = []
    for token, token_id in added:
        init = inits[token]
        if init.startswith("copy:"):
            row_inits.append(RowInit(token_id, "copy", _resolve(tokenizer, init.removeprefix("copy:"), token)))
        else:
            row_inits.append(RowInit(token_id, init))
    return added, row_inits


def _resolve(tokenizer, ref: str, token: str) -> int:
    if ref.isdigit():
        return int(ref)
    if ref not in tokenizer.get_vocab():
        raise UsageError(f"token {token!r} copies {ref!r}, which is not in the vocabulary", where="--add-tokens")
    return tokenizer.convert_tokens_to_ids(ref)


def prepare_tokenizer(path: Path | None, requests: Sequence[TokenRequest], chat_template: Path | None):
    """Load, extend and template the tokenizer. Returns (tokenizer or None, TokenizerOutcome)."""
    if path is None:
        if requests and any(not r.if_missing for r in requests):
            raise UsageError(
                "--add-tokens needs a tokenizer, and none was found",
                hint="pass --tokenizer PATH (a dir with tokenizer.json / tokenizer_config.json)",
            )
        log.warning(
            "no tokenizer found in SRC or the checkpoint dir; the output will have none "
            "(pass --tokenizer PATH to add one)"
        )
        return None, TokenizerOutcome(None, 0)
    tokenizer = load_tokenizer(path)
    added, row_inits = apply_requests(tokenizer, requests)
    if chat_template is not None:
        try:
            tokenizer.chat_template = chat_template.read_text()
        except OSError as exc:
            raise UsageError("cannot read --chat-template", where=chat_template, hint=exc.strerror) from exc
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if not has_template:
        log.warning("the tokenizer has no chat template; pass --chat-template FILE for chat models")
    for token, token_id in added:
        log.info("added token %r as id %d", token, token_id)
    ids = {f"{r}_id": getattr(tokenizer, f"{r}_id", None) for r in ("bos_token", "eos_token", "pad_token")}
    return tokenizer, TokenizerOutcome(
        path, len(tokenizer), tuple(added), tuple(row_inits), ids, has_template, dict(tokenizer.get_vocab())
    )
