"""Frozen configuration of one finalize run, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from distfinalize.hfnames import DTYPE_NAMES

if TYPE_CHECKING:
    import torch

    from distfinalize.artifacts.hub import HubOptions
    from distfinalize.transform.keymap import KeyMapRules

DEVICES = ("auto", "cpu", "cuda")
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_MAX_SHARD_SIZE = "5GB"
STRATEGIES = ("read", "exchange")  # how bytes reach the rank that writes them (distfinalize.write.feed)
DEFAULT_READ_BATCH = "256MiB"
DEFAULT_WRITE_THREADS = 2


# Size units as transformers' convert_file_size_to_int reads them (a lowercase final "b" of KB/MB/GB: bits).
SIZE_UNITS = (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3))


def parse_size(text: str | int, what: str = "max shard size") -> int:
    """Parse a shard size the way transformers does ("5GB" = 5e9 bytes, "1GiB" = 2**30, "200MB", ints), without
    importing it (the command line parses before any heavy import).

    Raises ValueError naming the bad value and the accepted forms.
    """
    size = text if isinstance(text, int) else None
    if isinstance(text, str):
        text = text.strip()
        if text.isdigit():
            size = int(text)
        for unit, factor in SIZE_UNITS:
            if size is None and text.upper().endswith(unit):
                try:
                    size = int(text[: -len(unit)]) * factor
                except ValueError:
                    break
                if len(unit) == 2 and text.endswith("b"):
                    size //= 8
    if not isinstance(size, int) or size <= 0:
        raise ValueError(
            f"{what} {text!r} is not a size; use a positive integer of bytes or a number with a unit: "
            "KB, MB, GB (powers of 10) or KiB, MiB, GiB (powers of 2), e.g. 5GB"
        )
    return size


def format_bytes(size: float) -> str:
    """Human-readable binary size: 812 B, 190.62 KiB, 3.21 GiB."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    step = 0
    while abs(size) >= 1024 and step < len(units) - 1:
        size /= 1024
        step += 1
    return f"{size:.0f} B" if step == 0 else f"{size:.2f} {units[step]}"


GENERATION_MODES = ("carry", "none")  # or a path to a preset JSON


@dataclass(frozen=True, kw_only=True)
class TokenizerOptions:
    """--tokenizer, --chat-template, --add-tokens, --skip-default-tokens, --pad-vocab-to-multiple-of."""

    path: Path | None = None
    chat_template: Path | None = None
    add_tokens: Path | None = None
    default_tokens: bool = True
    pad_vocab_multiple: int | None = None

    def __post_init__(self) -> None:
        if self.pad_vocab_multiple is not None and self.pad_vocab_multiple <= 0:
            raise ValueError(f"--pad-vocab-to-multiple-of must be positive, got {self.pad_vocab_multiple}")


@dataclass(frozen=True, kw_only=True)
class GenerationOptions:
    """--generation-config (carry | none | a preset path), --stop-tokens, --no-auto-stop-tokens."""

    mode: str = "carry"
    stop_tokens: tuple[str, ...] = ()
    auto_stop_tokens: bool = True

    @property
    def preset(self) -> Path | None:
        return None if self.mode in GENERATION_MODES else Path(self.mode)


@dataclass(frozen=True, kw_only=True)
class CardOptions:
    """Model card metadata: --base-model-id, --dataset, --training-method, --log-url."""

    base_model_id: str | None = None
    datasets: tuple[str, ...] = ()
    training_method: str | None = None
    log_urls: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class LoraOptions:
    """--merge-lora and the adapter settings that override (or stand in for) the source's adapter_config.json."""

    merge: bool = False
    r: int | None = None
    alpha: float | None = None
    target_modules: tuple[str, ...] = ()
    use_rslora: bool | None = None
    require_alpha: bool = True  # inspect reports an unknown lora_alpha instead of failing

    def __post_init__(self) -> None:
        if self.r is not None and self.r <= 0:
            raise ValueError(f"--lora-r must be positive, got {self.r}")
        if self.alpha is not None and self.alpha <= 0:
            raise ValueError(f"--lora-alpha must be positive, got {self.alpha}")

    @property
    def overrides(self) -> dict[str, object]:
        """The LoraConfig fields the flags set."""
        alpha = int(self.alpha) if self.alpha is not None and float(self.alpha).is_integer() else self.alpha
        out: dict[str, object] = {"r": self.r, "lora_alpha": alpha, "use_rslora": self.use_rslora}
        out["target_modules"] = list(self.target_modules) or None
        return {k: v for k, v in out.items() if v is not None}


@dataclass(frozen=True, kw_only=True)
class FinalizeConfig:
    """What to finalize, where to, and how. Identical on every rank."""

    src: Path
    dest: Path | None = None  # None: nothing is to be written (inspect, verify --source)
    checkpoint: Path | None = None
    tag: str | None = None  # DeepSpeed tag (a global_stepN folder) instead of the one in `latest`
    dtype: str | None = None
    key_map: str | KeyMapRules | None = None  # a registered key map or a file's rules; default: the matching one
    quantize: str | None = None  # a recipe of distfinalize.transform.quant.recipes.RECIPES
    quantize_ignore: tuple[str, ...] = ()  # regexes of module names left unquantized
    quantize_skip_nonfinite: bool = False  # a weight holding NaN/Inf is left unquantized (else: an error)
    max_shard_size: int = 5 * 10**9
    device: str = "auto"
    dry_run: bool = False
    log_level: str = "info"
    timeout_s: float = 1800.0
    read_batch_bytes: int = 256 * 2**20  # one read, or one exchange round's bytes per rank; 2x this in flight
    strategy: str = "read"
    write_threads: int = DEFAULT_WRITE_THREADS  # output files a rank writes at once
    base_model: Path | None = None  # a local HF dir (a Hub id is resolved to its snapshot dir before prepare)
    tensors_only: bool = False  # no config.json anywhere: write the tensors as stored instead of failing
    tokenizer: TokenizerOptions = TokenizerOptions()
    generation: GenerationOptions = GenerationOptions()
    card: CardOptions = CardOptions()
    lora: LoraOptions = LoraOptions()
    resume: bool = False
    keep_checkpoint: bool = False
    keep_optimizer: bool = False
    hub: HubOptions | None = None
    report: Path | None = None  # --report FILE.json: the closing summary's figures, written by rank 0

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype {self.dtype!r} is not supported; choose one of {', '.join(DTYPE_NAMES)}")
        if self.device not in DEVICES:
            raise ValueError(f"device {self.device!r} is not supported; choose one of {', '.join(DEVICES)}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log level {self.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
        if self.max_shard_size <= 0:
            raise ValueError(f"max shard size must be positive, got {self.max_shard_size}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout must be positive, got {self.timeout_s}")
        if self.read_batch_bytes <= 0:
            raise ValueError(f"read batch must be positive, got {self.read_batch_bytes}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"--strategy {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if self.write_threads <= 0:
            raise ValueError(f"--write-threads must be positive, got {self.write_threads}")
        if self.quantize is not None:
            from distfinalize.transform.quant.recipes import RECIPES

            if self.quantize not in RECIPES:
                raise ValueError(f"--quantize {self.quantize!r} is not a recipe; choose one of {', '.join(RECIPES)}")
        if self.quantize_skip_nonfinite and self.quantize is None:
            raise ValueError("--quantize-skip-nonfinite needs --quantize")
        if self.keep_optimizer and not self.keep_checkpoint:
            raise ValueError("--keep-optimizer needs --keep-checkpoint")

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The requested output dtype, or None for "as config.json / as stored"."""
        from distfinalize.hfnames import DTYPES

        return DTYPES[self.dtype] if self.dtype else None
