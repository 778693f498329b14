"""Text encoders: prompts -> the DiT's cross-attention context [B, text_len, text_dim].

Wan2.1 cuts the encoder output to each prompt's real token count and zero-pads it to text_len;
the DiT's cross-attention does not mask, so the padding must be exact zeros (REFERENCE 1).

- `UMT5TextEncoder`: the real UMT5-XXL encoder (transformers), from operator weights.
- `BuiltinTextEncoder`: a deterministic hashed embedding with no weights, for the random-weight
  tiny/bench presets, so the whole stack runs and is testable without downloads.
"""

from __future__ import annotations

import hashlib
import html
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from histream_model.config import TextEncoderConfig
from histream_model.weights.common import WeightsError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, UMT5EncoderModel

TEXT_ENCODER_KINDS = ("umt5", "builtin")
MAX_PROMPT_CHARS = 2000

# Builtin tokens: runs of word characters, or single punctuation marks.
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_WHITESPACE_RE = re.compile(r"\s+")


@runtime_checkable
class TextEncoder(Protocol):
    """Anything that turns prompts into zero-padded text context for the DiT."""

    text_len: int  # tokens per prompt after truncation and zero padding
    text_dim: int  # channels per token (the DiT's text_dim)

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """float32 [B, text_len, text_dim] on the encoder's device; zeros past each prompt."""
        ...


def check_prompt(prompt: str, max_chars: int = MAX_PROMPT_CHARS) -> str:
    """The stripped prompt; raises ValueError for an empty one or one over `max_chars`."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    stripped = prompt.strip()
    if not stripped:
        raise ValueError(f"prompt is empty or only whitespace: {prompt!r}")
    if len(stripped) > max_chars:
        raise ValueError(f"prompt has {len(stripped)} characters; the limit is {max_chars}")
    return stripped


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of str, not a single str; wrap it in a list")
    if len(prompts) == 0:
        raise ValueError("prompts is empty; pass at least one prompt")
    return [check_prompt(p) for p in prompts]


def _check_sizes(text_dim: int, text_len: int) -> None:
    if text_dim < 1:
        raise ValueError(f"text_dim={text_dim} must be >= 1")
    if text_len < 1:
        raise ValueError(f"text_len={text_len} must be >= 1")


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """Fixed position table [length, dim]: cat[sin, cos] of pos * 10000^(-i/half)."""
    half = (dim + 1) // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64) / half)
    angles = torch.outer(torch.arange(length, dtype=torch.float64), freqs)  # (L, half)
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)[:, :dim]  # (L, dim)
    return table.to(torch.float32)


class BuiltinTextEncoder:
    """Hashed-token embeddings + fixed positions: deterministic, weight-free, not semantic.

    Token ids come from blake2b (Python's hash() is salted per process), and the table from a
    seeded CPU generator, so the same prompt gives the same tensor in every process.
    """

    def __init__(
        self,
        text_dim: int,
        text_len: int,
        vocab_size: int,
        seed: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        _check_sizes(text_dim, text_len)
        if vocab_size < 1:
            raise ValueError(f"vocab_size={vocab_size} must be >= 1")
        self.text_dim = text_dim
        self.text_len = text_len
        self.vocab_size = vocab_size
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        generator = torch.Generator().manual_seed(seed)
        tokens = torch.randn(vocab_size, text_dim, generator=generator)  # (V, D), var 1
        positions = sinusoidal_positions(text_len, text_dim)  # (L, D), var ~0.5
        # Dividing by sqrt(1.5) keeps token + position at about unit variance.
        scale = 1.0 / math.sqrt(1.5)
        self.token_table = (tokens * scale).to(self.device)
        self.position_table = (positions * scale).to(self.device)

    def token_ids(self, prompt: str) -> list[int]:
        """Ids of the prompt's first text_len tokens (lowercased words and punctuation)."""
        words = _TOKEN_RE.findall(prompt.lower())[: self.text_len]
        return [
            int.from_bytes(hashlib.blake2b(w.encode("utf-8"), digest_size=8).digest(), "big")
            % self.vocab_size
            for w in words
        ]

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        cleaned = _check_prompts(prompts)
        out = torch.zeros(len(cleaned), self.text_len, self.text_dim, device=self.device)
        for b, prompt in enumerate(cleaned):
            ids = torch.tensor(self.token_ids(prompt), dtype=torch.long, device=self.device)
            n = ids.numel()
            out[b, :n] = self.token_table[ids] + self.position_table[:n]  # (n, D)
        return out


def clean_prompt(prompt: str) -> str:
    """Wan2.1's prompt cleaning without ftfy: unescape HTML twice, collapse whitespace."""
    return _WHITESPACE_RE.sub(" ", html.unescape(html.unescape(prompt))).strip()


class UMT5TextEncoder:
    """The UMT5 encoder of Wan2.1 (UMT5-XXL for the real model), run as Wan runs it."""

    def __init__(
        self,
        model: UMT5EncoderModel,
        tokenizer: PreTrainedTokenizerBase,
        text_len: int = 512,
    ) -> None:
        _check_sizes(int(model.config.d_model), text_len)
        self.model = model.eval().requires_grad_(False)
        # Real tokens must come first: padding is cut off by position, as Wan does.
        tokenizer.padding_side = "right"
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.text_dim = int(model.config.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        text_len: int = 512,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> UMT5TextEncoder:
        """Load a diffusers-layout directory: `text_encoder/` and `tokenizer/`, offline."""
        # transformers is imported here so the builtin encoder never pays its import time.
        from transformers import AutoTokenizer, UMT5EncoderModel

        root = _check_umt5_dir(directory)
        model = UMT5EncoderModel.from_pretrained(
            root / "text_encoder", dtype=dtype, local_files_only=True
        )
        if device is not None:
            model = model.to(device)
        tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
        return cls(model, tokenizer, text_len)

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        cleaned = [clean_prompt(p) for p in _check_prompts(prompts)]
        batch = self.tokenizer(
            cleaned,
            padding="max_length",
            max_length=self.text_len,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids = batch["input_ids"].to(self.device)  # (B, L)
        mask = batch["attention_mask"].to(self.device)  # (B, L), 1 for real tokens
        with torch.no_grad():
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, D)
        # where(), not a multiply, so a non-finite value at a pad position still becomes 0.
        keep = mask.bool().unsqueeze(-1)  # (B, L, 1)
        return torch.where(keep, hidden.float(), torch.zeros((), device=hidden.device))


def _check_umt5_dir(directory: str | Path | None) -> Path:
    if directory is None:
        raise WeightsError(
            "the umt5 text encoder needs weights_dir: a directory with text_encoder/ "
            "(UMT5EncoderModel) and tokenizer/ subfolders"
        )
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise WeightsError(f"text encoder weights_dir {str(directory)!r} is not a directory")
    for sub in ("text_encoder", "tokenizer"):
        if not (root / sub).is_dir():
            raise WeightsError(
                f"text encoder weights_dir {str(root)!r} has no {sub}/ subfolder "
                "(expected text_encoder/ and tokenizer/)"
            )
    return root


def build_text_encoder(
    config: TextEncoderConfig,
    text_dim: int,
    text_len: int,
    weights_dir: str | Path | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> TextEncoder:
    """The encoder a preset asks for; `text_dim`/`text_len` come from its DiTConfig."""
    if config.kind == "builtin":
        return BuiltinTextEncoder(text_dim, text_len, config.vocab_size, device=device)
    if config.kind == "umt5":
        root = _check_umt5_dir(weights_dir)
        encoder = UMT5TextEncoder.from_pretrained(root, text_len, device, dtype)
        if encoder.text_dim != text_dim:
            raise WeightsError(
                f"text encoder in {str(root)!r} has d_model={encoder.text_dim}; "
                f"the DiT expects text_dim={text_dim}"
            )
        return encoder
    raise ValueError(
        f"unknown text encoder kind {config.kind!r}; choose one of {TEXT_ENCODER_KINDS}"
    )
