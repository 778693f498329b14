"""Text encoders: builtin determinism and padding; UMT5 parity with transformers on a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, UMT5EncoderModel

from histream_model.config import PRESETS, TextEncoderConfig
from histream_model.text import (
    BuiltinTextEncoder,
    TextEncoder,
    UMT5TextEncoder,
    build_text_encoder,
    check_prompt,
)
from histream_model.weights.common import WeightsError

FOX = "A red fox jumps over the lazy dog."


@pytest.fixture
def builtin() -> BuiltinTextEncoder:
    tiny = PRESETS["tiny"]
    return BuiltinTextEncoder(tiny.dit.text_dim, tiny.dit.text_len, tiny.text.vocab_size)


# Builtin encoder


def test_builtin_shape_dtype_and_protocol(builtin: BuiltinTextEncoder) -> None:
    out = builtin.encode([FOX, "hello"])
    assert out.shape == (2, 16, 32)
    assert out.dtype == torch.float32
    assert isinstance(builtin, TextEncoder)


def test_builtin_golden_values(builtin: BuiltinTextEncoder) -> None:
    # Pinned from a separate process: blake2b ids + a seeded table do not depend on
    # PYTHONHASHSEED, so these hold in every process (for this torch RNG).
    assert builtin.token_ids(FOX) == [559, 163, 951, 387, 82, 558, 350, 159, 132]
    out = builtin.encode([FOX])
    assert out.sum().item() == pytest.approx(82.713638, abs=1e-4)
    torch.testing.assert_close(
        out[0, 0, :4], torch.tensor([-0.457164, 0.777868, -0.354314, 0.119127]), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        out[0, 8, -3:], torch.tensor([0.998075, 1.503609, 0.403389]), atol=1e-5, rtol=0
    )


def test_builtin_deterministic_and_prompt_sensitive(builtin: BuiltinTextEncoder) -> None:
    a = builtin.encode([FOX])
    again = BuiltinTextEncoder(32, 16, 1024).encode([FOX])
    assert torch.equal(a, again)
    assert not torch.equal(a, builtin.encode(["A blue fox jumps over the lazy dog."]))
    reordered = builtin.encode(["fox red A jumps over the lazy dog."])
    assert not torch.equal(a, reordered)
    # Same bag of words, different order: positions 0-2 differ, the rest are identical.
    assert torch.equal(a[0, 3:], reordered[0, 3:])
    assert not torch.equal(BuiltinTextEncoder(32, 16, 1024, seed=1).encode([FOX]), a)


def test_builtin_case_and_whitespace_insensitive(builtin: BuiltinTextEncoder) -> None:
    assert torch.equal(
        builtin.encode([FOX]), builtin.encode(["  a RED fox\tjumps over the lazy dog . "])
    )


def test_builtin_zero_padding_beyond_length(builtin: BuiltinTextEncoder) -> None:
    out = builtin.encode(["a cat", FOX])  # 2 and 9 tokens
    assert torch.count_nonzero(out[0, 2:]) == 0
    assert torch.count_nonzero(out[1, 9:]) == 0
    assert bool((out[0, :2].abs().sum(-1) > 0).all())
    assert bool((out[1, :9].abs().sum(-1) > 0).all())
    # Batching does not change a prompt's encoding.
    assert torch.equal(out[1], builtin.encode([FOX])[0])


def test_builtin_truncates_at_text_len(builtin: BuiltinTextEncoder) -> None:
    words = [f"w{i}" for i in range(40)]
    long = builtin.encode([" ".join(words)])
    prefix = builtin.encode([" ".join(words[:16])])
    assert torch.equal(long, prefix)
    assert bool((long[0].abs().sum(-1) > 0).all())


def test_builtin_roughly_unit_variance() -> None:
    enc = BuiltinTextEncoder(64, 32, 4096)
    out = enc.encode([" ".join(f"word{i}" for i in range(32))])
    assert 0.8 < out.std().item() < 1.2


def test_builtin_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="text_len=0 must be >= 1"):
        BuiltinTextEncoder(32, 0, 1024)
    with pytest.raises(ValueError, match="vocab_size=0 must be >= 1"):
        BuiltinTextEncoder(32, 16, 0)


# Prompt checks


def test_check_prompt() -> None:
    assert check_prompt("  a cat  ") == "a cat"
    with pytest.raises(ValueError, match="empty or only whitespace"):
        check_prompt("")
    with pytest.raises(ValueError, match="empty or only whitespace"):
        check_prompt(" \n\t")
    with pytest.raises(ValueError, match="has 11 characters; the limit is 10"):
        check_prompt("abcdefghijk", max_chars=10)
    assert check_prompt("abcdefghij", max_chars=10) == "abcdefghij"


def test_encode_checks_every_prompt(builtin: BuiltinTextEncoder) -> None:
    with pytest.raises(ValueError, match="empty or only whitespace"):
        builtin.encode(["a cat", "  "])
    with pytest.raises(ValueError, match="the limit is 2000"):
        builtin.encode(["x" * 2001])
    with pytest.raises(ValueError, match="prompts is empty"):
        builtin.encode([])
    with pytest.raises(TypeError, match="not a single str"):
        builtin.encode("a cat")


# UMT5 encoder on a tiny random model


def test_umt5_matches_transformers(umt5_dir: Path) -> None:
    enc = UMT5TextEncoder.from_pretrained(umt5_dir, text_len=8)
    assert isinstance(enc, TextEncoder)
    assert (enc.text_len, enc.text_dim) == (8, 32)
    prompts = ["a cat runs", "Blue  sky &amp; zebra on the grass"]
    out = enc.encode(prompts)
    assert out.shape == (2, 8, 32)
    assert out.dtype == torch.float32

    model = UMT5EncoderModel.from_pretrained(umt5_dir / "text_encoder", local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(umt5_dir / "tokenizer", local_files_only=True)
    # Cleaning unescapes &amp; and collapses whitespace; "&" and "zebra" are unknown words.
    ids = tokenizer(
        ["a cat runs", "Blue sky & zebra on the grass"],
        padding="max_length", max_length=8, truncation=True, return_tensors="pt",
    )  # fmt: skip
    assert ids["input_ids"].tolist() == [
        [3, 4, 6, 1, 0, 0, 0, 0],
        [11, 12, 2, 2, 7, 8, 9, 1],
    ]
    with torch.no_grad():
        ref = model(**ids).last_hidden_state
    torch.testing.assert_close(out[0, :4], ref[0, :4], atol=0, rtol=0)
    torch.testing.assert_close(out[1], ref[1], atol=0, rtol=0)
    assert torch.count_nonzero(out[0, 4:]) == 0
    assert bool((out[0, :4].abs().sum(-1) > 0).all())
    # Wan semantics: real positions equal the prompt encoded alone, without any padding.
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([[3, 4, 6, 1]])).last_hidden_state
    torch.testing.assert_close(out[0, :4], alone[0], atol=1e-5, rtol=1e-5)


def test_umt5_truncates_keeping_eos(umt5_dir: Path) -> None:
    enc = UMT5TextEncoder.from_pretrained(umt5_dir, text_len=4)
    long = enc.encode(["a cat runs on the grass"])
    short = enc.encode(["a cat runs"])  # the same first 3 tokens + </s>
    torch.testing.assert_close(long, short, atol=0, rtol=0)
    assert torch.count_nonzero(long[0].abs().sum(-1)) == 4


def test_build_text_encoder(umt5_dir: Path) -> None:
    tiny = PRESETS["tiny"]
    enc = build_text_encoder(tiny.text, tiny.dit.text_dim, tiny.dit.text_len, weights_dir="ignored")
    assert isinstance(enc, BuiltinTextEncoder)
    assert (enc.text_len, enc.text_dim, enc.vocab_size) == (16, 32, 1024)
    umt5 = build_text_encoder(TextEncoderConfig(kind="umt5"), 32, 8, weights_dir=umt5_dir)
    assert isinstance(umt5, UMT5TextEncoder)
    with pytest.raises(ValueError, match="d_model=32; the DiT expects text_dim=4096"):
        build_text_encoder(TextEncoderConfig(kind="umt5"), 4096, 512, weights_dir=umt5_dir)
    with pytest.raises(ValueError, match="unknown text encoder kind 'clip'"):
        build_text_encoder(TextEncoderConfig(kind="clip"), 32, 8)


def test_umt5_missing_directories(tmp_path: Path, umt5_dir: Path) -> None:
    config = TextEncoderConfig(kind="umt5")
    with pytest.raises(WeightsError, match="needs weights_dir"):
        build_text_encoder(config, 32, 8, weights_dir=None)
    missing = tmp_path / "nowhere"
    with pytest.raises(WeightsError, match=f"'{missing}' is not a directory"):
        build_text_encoder(config, 32, 8, weights_dir=missing)
    (umt5_dir / "tokenizer").rename(umt5_dir / "tok")
    with pytest.raises(WeightsError, match="has no tokenizer/ subfolder"):
        UMT5TextEncoder.from_pretrained(umt5_dir)
    (umt5_dir / "text_encoder").rename(umt5_dir / "te")
    with pytest.raises(WeightsError, match="has no text_encoder/ subfolder"):
        build_text_encoder(config, 32, 8, weights_dir=umt5_dir)
    assert issubclass(WeightsError, ValueError)
