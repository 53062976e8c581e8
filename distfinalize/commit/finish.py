"""The finish step, rank 0: the files written once (index, manifest, config, generation config, tokenizer, card,
model code, kept checkpoint). When every rank agreed it succeeded, the pipeline commits (staging.commit, through
DistContext.run_commit): the atomic rename of the staging dir to DEST.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from distfinalize.artifacts.adapter import write_adapter_config
from distfinalize.artifacts.card import LIBRARY_NAME, CardInfo, write_model_card
from distfinalize.artifacts.code import copy_model_code, model_code_files
from distfinalize.artifacts.config import ConfigUpdates, output_config, write_config
from distfinalize.artifacts.generation import find_generation_config, generation_config, write_generation_config
from distfinalize.artifacts.index import write_index
from distfinalize.artifacts.tokenizer import FinalTokenizer, TokenizerOutcome
from distfinalize.commit.keep import OptimizerCopy, link_into_root, write_optimizer_metadata
from distfinalize.commit.manifest import MANIFEST, manifest_record, write_manifest
from distfinalize.config import FinalizeConfig
from distfinalize.errors import DestinationError
from distfinalize.hfnames import INDEX_FILE, write_json
from distfinalize.plan import Plan
from distfinalize.transform.keymap import KeyMapRules
from distfinalize.transform.quant.selection import quantization_config, unquantized_modules
from distfinalize.write.rank import WrittenFile

if TYPE_CHECKING:
    from distfinalize.prepare.prepared import Prepared

DROPPED_STATE = ("lr scheduler", "dataloader", "RNG", "trainer state")


def config_updates(
    config: FinalizeConfig, prepared: Prepared, tokenizer: TokenizerOutcome, vocab_size: int | None
) -> ConfigUpdates:
    return ConfigUpdates(
        dtype=prepared.dtype,
        tied=prepared.tied,
        architecture=prepared.spec.architecture if prepared.spec else None,
        vocab_size=vocab_size,
        token_ids=tokenizer.special_ids if tokenizer.path is not None else {},
        quantization_config=quantization_config(config, prepared),
    )


def source_label(src: Path, checkpoint: Path) -> str:
    """The checkpoint folder as the card and the manifests name it (they are published with --push-to-hub): its
    path relative to SRC ("." when SRC is the folder itself), or only its name when it lies outside SRC. Never an
    absolute path. Pure but for resolving symlinks."""
    folder, root = checkpoint.resolve(), src.resolve()
    return folder.relative_to(root).as_posix() if folder.is_relative_to(root) else folder.name


def card_info(config: FinalizeConfig, prepared: Prepared) -> CardInfo:
    info = prepared.source.info
    return CardInfo(
        source_format=info.format,
        source_path=source_label(config.src, info.path),
        step=info.step,
        saved_world_size=info.saved_world_size,
        dtype=str(prepared.dtype).removeprefix("torch.") if prepared.dtype else None,
        quantization=config.quantize,
        unquantized=tuple(unquantized_modules(config, prepared)),
        base_model_id=config.card.base_model_id,
        datasets=config.card.datasets,
        training_method=config.card.training_method,
        log_urls=config.card.log_urls,
        extra_libraries=("deepspeed",) if info.format == "deepspeed" else (),
        model_name=config.hub.repo_id if config.hub is not None else None,
        library_name="peft" if prepared.adapter else LIBRARY_NAME,
    )


def existing_card(prepared: Prepared) -> Path | None:
    if prepared.config_path is None:
        return None
    card = prepared.config_path.parent / "README.md"
    return card if card.is_file() else None


def finish(
    *,
    config: FinalizeConfig,
    plan: Plan,
    prepared: Prepared,
    tokenizer: FinalTokenizer,
    vocab_size: int | None,
    files: tuple[WrittenFile, ...],
    staging: Path,
    weights_dir: Path,
    optimizer: OptimizerCopy | None,
) -> None:
    """Everything written once, into the staging dir: index, checksums, config, generation config, tokenizer, card,
    code, kept checkpoint. The commit comes after every rank agreed. Runs on: rank 0."""
    with output_errors(staging):
        planned = {f.filename for f in plan.files}
        got = {f.filename for f in files}
        if got != planned:
            raise DestinationError(
                "ranks did not write every planned file", where=staging, hint=f"missing: {sorted(planned - got)[:4]}"
            )
        index = write_index(plan, weights_dir)
        write_checksums(staging, weights_dir, files, prepared, config)
        if prepared.adapter:
            write_adapter_config(prepared.lora, staging)  # no config.json, generation config or model code
            model_config = None
        elif prepared.config_path is not None:
            updates = config_updates(config, prepared, tokenizer.outcome, vocab_size)
            write_config(prepared.config_path, staging, updates)
            model_config = output_config(prepared.config_path, updates)
        else:
            model_config = {}
        generation = None
        if model_config is not None:
            generation = generation_config(
                find_generation_config(prepared.config_path), tokenizer.outcome, model_config, config.generation
            )
        if generation:
            write_generation_config(staging, generation)
        if tokenizer.tokenizer is not None:
            tokenizer.tokenizer.save_pretrained(str(staging))
        write_model_card(staging, card_info(config, prepared), existing_card(prepared))
        if prepared.config_path is not None and not prepared.adapter:
            copy_model_code(model_code_files(prepared.config_path.parent), staging)
        if config.keep_checkpoint:
            keep_checkpoint(config, plan, prepared, staging, weights_dir, index, optimizer)


@contextmanager
def output_errors(staging: Path) -> Iterator[None]:
    """An OSError while writing the output files becomes one DestinationError naming the file."""
    try:
        yield
    except OSError as exc:
        raise DestinationError(
            "cannot write the output files",
            where=getattr(exc, "filename", None) or staging,
            hint=f"{exc.strerror or exc}; free space or choose another DEST",
        ) from exc


def write_checksums(
    staging: Path, weights_dir: Path, files: tuple[WrittenFile, ...], prepared: Prepared, config: FinalizeConfig
) -> None:
    """distfinalize-manifest.json: every weight file's size and sha256, the source (its checkpoint folder relative
    to SRC, see source_label), and for `verify` what was done
    beyond a cast: --quantize (the recipe and the user's ignore patterns decide which weights it compares within
    a bound), the key map file's rules, and for a LoRA checkpoint what was done with the adapter."""
    info = prepared.source.info
    prefix = weights_dir.relative_to(staging)
    lora = {"lora": manifest_record(prepared.lora, config.base_model, config.src)} if prepared.lora is not None else {}
    write_json(
        staging / MANIFEST,
        {
            "format": 1,
            "source": {"format": info.format, "path": source_label(config.src, info.path), "step": info.step},
            "dtype": str(prepared.dtype).removeprefix("torch.") if prepared.dtype else None,
            "quantization": {
                "recipe": config.quantize,
                "ignore": list(config.quantize_ignore),
                **({"nonfinite": sorted(prepared.nonfinite)} if prepared.nonfinite else {}),
            }
            if config.quantize
            else None,
            "key_map": config.key_map.to_mapping() if isinstance(config.key_map, KeyMapRules) else config.key_map,
            "files": {
                str(prefix / name) if str(prefix) != "." else name: entry
                for name, entry in file_checksums(files).items()
            },
            **lora,
        },
    )


def file_checksums(files: tuple[WrittenFile, ...]) -> dict[str, dict[str, object]]:
    """The manifest's entry of each weight file: its size and sha256, or for a file several ranks wrote, the
    sha256 of each piece ("pieces": [[start, stop, sha256], ...], byte ranges covering the file in order). Pure."""
    by_name: dict[str, list[WrittenFile]] = {}
    for f in files:
        by_name.setdefault(f.filename, []).append(f)
    out: dict[str, dict[str, object]] = {}
    for name in sorted(by_name):
        parts = sorted(by_name[name], key=lambda f: f.offset)
        if len(parts) == 1 and parts[0].file_size is None:
            out[name] = {"size": parts[0].size, "sha256": parts[0].sha256}
        else:
            pieces = [[p.offset, p.offset + p.size, p.sha256] for p in parts]
            out[name] = {"size": parts[0].file_size, "pieces": pieces}
    return out


def keep_checkpoint(
    config: FinalizeConfig,
    plan: Plan,
    prepared: Prepared,
    staging: Path,
    weights_dir: Path,
    index: Path | None,
    optimizer: OptimizerCopy | None,
) -> None:
    """Manifest, config copy and optimizer metadata in the kept checkpoint; root symlinks. Runs on: rank 0."""
    names = [f.filename for f in plan.files] + ([INDEX_FILE] if index is not None else [])
    if (staging / "config.json").is_file():
        (weights_dir / "config.json").write_bytes((staging / "config.json").read_bytes())
    if optimizer is not None:
        write_optimizer_metadata(optimizer, weights_dir / "optimizer")
    info = prepared.source.info
    write_manifest(
        weights_dir,
        {
            "source": {
                "format": info.format,
                "path": source_label(config.src, info.path),
                "step": info.step,
                "saved_world_size": info.saved_world_size,
            },
            "weights": names,
            "config": "config.json" if (weights_dir / "config.json").is_file() else None,
            "optimizer": "optimizer" if optimizer is not None else None,
            "dropped": list(DROPPED_STATE) + ([] if optimizer is not None else ["optimizer"]),
        },
    )
    link_into_root(staging, weights_dir, names)
