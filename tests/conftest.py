"""Shared test fixtures: tiny random checkpoints in the layouts operators provide."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Tests that start a Ray instance: those on the service fixtures, and those marked `ray` by hand
# (e.g. `histream serve` as a process). One local Ray at a time, so `make test` runs them in one
# pytest process (`-m ray`) and every other test beside them in a second (`-m "not ray"`).
RAY_FIXTURES = {"service"}  # the tenants and scaling apps request it too


def pytest_itemcollected(item: pytest.Item) -> None:
    """Mark each test that needs the service fixtures `ray` as it is collected."""
    if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
        item.add_marker(pytest.mark.ray)


WORDS = ["a", "cat", "dog", "runs", "on", "the", "grass", "red", "blue", "sky"]
VOCAB = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
TINY_TEXT_DIM = 32


def write_tiny_umt5(root: Path) -> Path:
    """root/text_encoder (tiny random UMT5) + root/tokenizer (word-level, built offline)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    tok = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    config = UMT5Config(
        vocab_size=100, d_model=TINY_TEXT_DIM, d_kv=8, num_heads=4, num_layers=2, d_ff=64,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    UMT5EncoderModel(config).save_pretrained(root / "text_encoder")
    return root


def write_tiny_diffusers_pipeline(root: Path) -> Path:
    """A diffusers-layout Wan pipeline directory: transformer/, vae/, text_encoder/, tokenizer/."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    torch.manual_seed(0)
    WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
        out_channels=16, text_dim=TINY_TEXT_DIM, freq_dim=32, ffn_dim=32, num_layers=2,
    ).save_pretrained(root / "transformer")  # fmt: skip
    AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1).save_pretrained(
        root / "vae"
    )
    return write_tiny_umt5(root)


@pytest.fixture
def umt5_dir(tmp_path: Path) -> Path:
    return write_tiny_umt5(tmp_path)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_diffusers_pipeline(tmp_path_factory.mktemp("pipeline"))
