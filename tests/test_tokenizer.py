"""Tokenizers: the built-in byte-level one, HF tokenizer.json files, and the plain-JSON lookup of
the image placeholder that the checkpoint loader uses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nvlm.config import BYTE_TOKENIZER_IMAGE_TOKEN_ID, BYTE_TOKENIZER_VOCAB_SIZE, NVLMConfig
from nvlm.tokenizer import (ByteTokenizer, HFTokenizer, Tokenizer, find_image_token_id,
                            load_tokenizer)

# --- ByteTokenizer -------------------------------------------------------------------------------


def test_byte_tokenizer_ids_agree_with_config():
    tok = ByteTokenizer()
    assert tok.vocab_size == BYTE_TOKENIZER_VOCAB_SIZE == 264
    assert tok.image_token_id == BYTE_TOKENIZER_IMAGE_TOKEN_ID == 259
    assert tok.image_token == "<|vision_pad|>"
    assert NVLMConfig.from_preset("tiny").llm.vocab_size == tok.vocab_size
    assert NVLMConfig.from_preset("tiny").image_token_id == tok.image_token_id
    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_pad|>")
    assert [tok.token_to_id(t) for t in specials] == [256, 257, 258, 259]
    assert tok.eos_token_ids == (258, 256)
    assert tok.pad_token_id == 256
    assert isinstance(tok, Tokenizer)


def test_byte_tokenizer_encodes_utf8_bytes_and_special_tokens():
    tok = ByteTokenizer()
    assert tok.encode("Aé") == [65, 0xC3, 0xA9]
    assert tok.encode("<|im_start|>user\nhi<|im_end|>") == [257, *b"user\nhi", 258]
    # A broken special-token string is plain text.
    assert tok.encode("<|im_end|") == list(b"<|im_end|")
    assert tok.encode("") == []


@pytest.mark.parametrize("text", [
    "plain ascii", "héllo wörld — 你好 🙂", "<|im_start|>system\nx<|im_end|>\n",
    "a<|vision_pad|><|vision_pad|>b<|endoftext|>", "",
])
def test_byte_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


def test_byte_tokenizer_decode_skips_special_tokens_and_replaces_bad_utf8():
    tok = ByteTokenizer()
    ids = tok.encode("<|im_start|>ü<|vision_pad|>!<|im_end|>")
    assert tok.decode(ids) == "ü!"
    assert tok.decode(torch.tensor(ids), skip_special_tokens=False) == \
        "<|im_start|>ü<|vision_pad|>!<|im_end|>"
    assert tok.decode([0xC3]) == "\ufffd"             # half of a two-byte character
    assert tok.decode([0xC3, 258, 0xA9]) == "\ufffd\ufffd"   # a special splits the character
    assert tok.decode([104, 260, 105], skip_special_tokens=False) == "hi"   # padding rows
    with pytest.raises(ValueError, match=r"ids\[1\].*\[0, 264\).*264"):
        tok.decode([1, 264])


def test_byte_tokenizer_token_to_id():
    tok = ByteTokenizer()
    assert tok.token_to_id("a") == 97
    assert tok.token_to_id("é") is None               # two bytes: not one token
    assert tok.token_to_id("<IMG_CONTEXT>") is None


def test_byte_tokenizer_rejects_non_str():
    with pytest.raises(TypeError, match="text: expected str, got bytes"):
        ByteTokenizer().encode(b"abc")


# --- HF tokenizer.json ---------------------------------------------------------------------------

CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def write_tokenizer_json(directory: Path, special_tokens: list[str]) -> Path:
    """A tiny byte-level BPE trained on a few sentences, plus the given added special tokens."""
    tokenizers = pytest.importorskip("tokenizers", reason="HF tokenizers is not installed")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["hello world", "what is in the image", "a cat on a mat"] * 5,
                                  trainer=trainer)
    tokenizer.add_special_tokens(special_tokens)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def test_hf_tokenizer_finds_vision_pad(tmp_path):
    write_tokenizer_json(tmp_path, CHATML + ["<|vision_pad|>"])
    tok = HFTokenizer.from_dir(tmp_path)
    assert isinstance(tok, Tokenizer)
    assert tok.image_token == "<|vision_pad|>"
    vision_pad = tok.token_to_id("<|vision_pad|>")
    assert tok.image_token_id == vision_pad
    assert tok.eos_token_ids == (tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>"))
    assert tok.pad_token_id == tok.token_to_id("<|endoftext|>")
    assert tok.vocab_size == tok.token_to_id("<|vision_pad|>") + 1

    text = "<|im_start|>user\nhello<|vision_pad|><|vision_pad|> wörld<|im_end|>\n"
    ids = tok.encode(text)
    assert ids.count(vision_pad) == 2
    assert ids[0] == tok.token_to_id("<|im_start|>")
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == "user\nhello wörld\n"


def test_hf_tokenizer_finds_img_context_and_accepts_explicit_token(tmp_path):
    write_tokenizer_json(tmp_path, CHATML + ["<IMG_CONTEXT>", "<img_here>"])
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer)
    assert tok.image_token == "<IMG_CONTEXT>"
    explicit = HFTokenizer.from_file(tmp_path / "tokenizer.json", image_token="<img_here>")
    assert explicit.image_token_id == explicit.token_to_id("<img_here>")


def test_hf_tokenizer_errors(tmp_path):
    write_tokenizer_json(tmp_path / "no_image", CHATML)
    with pytest.raises(ValueError, match="pass image_token="):
        HFTokenizer.from_dir(tmp_path / "no_image")
    write_tokenizer_json(tmp_path / "no_chatml", ["<|endoftext|>", "<|vision_pad|>"])
    with pytest.raises(ValueError, match=r"'<\|im_start\|>' is not in the vocabulary"):
        HFTokenizer.from_dir(tmp_path / "no_chatml")
    with pytest.raises(ValueError, match="image_token '<image_here>' is not in the vocabulary"):
        HFTokenizer.from_dir(tmp_path / "no_image", image_token="<image_here>")
    # "Ġworld" is a BPE vocabulary entry but not an added token: as text it splits into pieces.
    with pytest.raises(ValueError, match="image_token 'Ġworld' encodes to .* single id"):
        HFTokenizer.from_dir(tmp_path / "no_image", image_token="Ġworld")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HFTokenizer.from_dir(tmp_path / "missing")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable tokenizer.json"):
        HFTokenizer.from_dir(tmp_path / "broken")


def test_hf_tokenizer_without_endoftext(tmp_path):
    write_tokenizer_json(tmp_path, ["<|im_start|>", "<|im_end|>", "<IMG_CONTEXT>"])
    tok = HFTokenizer.from_dir(tmp_path)
    assert tok.eos_token_ids == (tok.token_to_id("<|im_end|>"),)
    assert tok.pad_token_id == tok.token_to_id("<|im_end|>")


# --- find_image_token_id (plain JSON, no tokenizers library) ------------------------------------


def test_find_image_token_id_reads_tokenizer_json(tmp_path):
    write_tokenizer_json(tmp_path / "qwen", CHATML + ["<|vision_pad|>"])
    write_tokenizer_json(tmp_path / "internvl", CHATML + ["<IMG_CONTEXT>"])
    write_tokenizer_json(tmp_path / "both", CHATML + ["<IMG_CONTEXT>", "<|vision_pad|>"])
    for name, token in [("qwen", "<|vision_pad|>"), ("internvl", "<IMG_CONTEXT>"),
                        ("both", "<|vision_pad|>")]:
        expected = HFTokenizer.from_dir(tmp_path / name).token_to_id(token)
        assert find_image_token_id(tmp_path / name) == expected


def test_find_image_token_id_plain_files(tmp_path):
    # Written by hand, as a checkpoint would ship them: Qwen2.5's real id for <|vision_pad|>.
    qwen = tmp_path / "qwen"
    qwen.mkdir()
    (qwen / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {
        "151643": {"content": "<|endoftext|>", "special": True},
        "151654": {"content": "<|vision_pad|>", "special": True}}}))
    assert find_image_token_id(qwen) == 151654

    internvl = tmp_path / "internvl"
    internvl.mkdir()
    (internvl / "added_tokens.json").write_text(json.dumps({"<IMG_CONTEXT>": 151648}))
    assert find_image_token_id(internvl) == 151648

    in_vocab = tmp_path / "in_vocab"
    in_vocab.mkdir()
    (in_vocab / "tokenizer.json").write_text(json.dumps({
        "added_tokens": [{"id": 3, "content": "<|im_end|>"}],
        "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "<IMG_CONTEXT>": 2}}}))
    assert find_image_token_id(in_vocab) == 2

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    assert find_image_token_id(empty) is None
    assert find_image_token_id(tmp_path / "does_not_exist") is None

    no_token = tmp_path / "no_token"
    no_token.mkdir()
    (no_token / "added_tokens.json").write_text(json.dumps({"<|im_end|>": 5}))
    assert find_image_token_id(no_token) is None

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer_config.json").write_text("{")
    with pytest.raises(ValueError, match="tokenizer_config.json.*not a readable JSON"):
        find_image_token_id(broken)


# --- load_tokenizer ------------------------------------------------------------------------------


def test_load_tokenizer_falls_back_to_bytes_only_without_tokenizer_files(tmp_path):
    assert isinstance(load_tokenizer(), ByteTokenizer)
    (tmp_path / "config.json").write_text("{}")
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    (tmp_path / "tokenizer.model").write_bytes(b"sentencepiece")
    with pytest.raises(ValueError, match=r"\['tokenizer.model'\] but no tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")
