"""Tokenizers behind one interface: a built-in byte-level one and HF `tokenizer.json` files.

    tokenizer = load_tokenizer()                      # ByteTokenizer: no files, the tiny preset's
    tokenizer = load_tokenizer("NVLM-D-72B/")         # HFTokenizer: the checkpoint's tokenizer.json
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n")   # special strings -> one id each

Every tokenizer knows the image placeholder (`<|vision_pad|>` for NVLM-D / Qwen2.5,
`<IMG_CONTEXT>` for InternVL2) and the ChatML tokens (docs/nvlm.md section 6). The HF `tokenizers`
library is optional: it is imported only when a `tokenizer.json` is actually loaded, and
`find_image_token_id` reads the same files as plain JSON so the checkpoint loader never needs it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence, runtime_checkable

from nvlm.config import BYTE_TOKENIZER_IMAGE_TOKEN_ID, BYTE_TOKENIZER_VOCAB_SIZE
from .errors import InputError

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_PAD = "<|vision_pad|>"      # NVLM-D / Qwen2.5 image placeholder (Qwen2.5 id 151654)
IMG_CONTEXT = "<IMG_CONTEXT>"      # InternVL2 image placeholder
# Placeholder names a checkpoint may use, in order of preference.
IMAGE_TOKEN_CANDIDATES: tuple[str, ...] = (VISION_PAD, IMG_CONTEXT)

TOKENIZER_FILES: tuple[str, ...] = ("tokenizer.json", "tokenizer_config.json", "added_tokens.json")


@runtime_checkable
class Tokenizer(Protocol):
    """What the processor, the trainer and generation need from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def image_token(self) -> str: ...

    @property
    def image_token_id(self) -> int: ...

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end an assistant answer: `<|im_end|>` and, where it exists, `<|endoftext|>`."""
        ...

    @property
    def pad_token_id(self) -> int: ...

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings inside it become their single id."""
        ...

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str: ...

    def token_to_id(self, token: str) -> int | None: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then four special tokens; needs no files.

    Ids: 256 `<|endoftext|>`, 257 `<|im_start|>`, 258 `<|im_end|>`, 259 `<|vision_pad|>` (the image
    placeholder); 260..263 are unused rows that pad the vocabulary to a multiple of 8 (the tiny
    preset's embedding size, `BYTE_TOKENIZER_VOCAB_SIZE` in nvlm.config).
    """

    SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END, VISION_PAD)
    _FIRST_SPECIAL_ID = 256

    def __init__(self) -> None:
        self._special_to_id = {tok: self._FIRST_SPECIAL_ID + i
                               for i, tok in enumerate(self.SPECIAL_TOKENS)}
        self._id_to_special = {i: tok for tok, i in self._special_to_id.items()}
        # Longest first, so that no special token is cut short by another that is its prefix.
        alternatives = sorted(self.SPECIAL_TOKENS, key=len, reverse=True)
        self._special_pattern = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")

    @property
    def vocab_size(self) -> int:
        num_ids = self._FIRST_SPECIAL_ID + len(self.SPECIAL_TOKENS)
        return -(-num_ids // 8) * 8

    @property
    def image_token(self) -> str:
        return VISION_PAD

    @property
    def image_token_id(self) -> int:
        return self._special_to_id[VISION_PAD]

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return (self._special_to_id[IM_END], self._special_to_id[ENDOFTEXT])

    @property
    def pad_token_id(self) -> int:
        return self._special_to_id[ENDOFTEXT]

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text: expected str, got {type(text).__name__}")
        ids: list[int] = []
        # re.split with a capturing group alternates plain text (even indices) and specials (odd).
        for i, piece in enumerate(self._special_pattern.split(text)):
            if i % 2:
                ids.append(self._special_to_id[piece])
            else:
                ids.extend(piece.encode("utf-8"))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = _as_int_list(ids)
        parts: list[str] = []
        pending = bytearray()   # bytes of a multi-byte character may span several ids
        for position, token_id in enumerate(ids):
            if 0 <= token_id < self._FIRST_SPECIAL_ID:
                pending.append(token_id)
                continue
            if not 0 <= token_id < self.vocab_size:
                raise InputError(f"ids[{position}]: expected an id in [0, {self.vocab_size}), "
                                 f"got {token_id}")
            parts.append(pending.decode("utf-8", errors="replace"))
            pending.clear()
            if not skip_special_tokens:
                # The padding ids 260..263 have no text.
                parts.append(self._id_to_special.get(token_id, ""))
        parts.append(pending.decode("utf-8", errors="replace"))
        return "".join(parts)

    def token_to_id(self, token: str) -> int | None:
        if token in self._special_to_id:
            return self._special_to_id[token]
        encoded = token.encode("utf-8")
        return encoded[0] if len(encoded) == 1 else None

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"


# The tiny preset's embedding table and image placeholder are sized from these constants; a
# mismatch would put image rows on the wrong ids without any error downstream.
if ByteTokenizer().vocab_size != BYTE_TOKENIZER_VOCAB_SIZE:
    raise AssertionError(f"ByteTokenizer.vocab_size {ByteTokenizer().vocab_size} != "
                         f"nvlm.config.BYTE_TOKENIZER_VOCAB_SIZE {BYTE_TOKENIZER_VOCAB_SIZE}")
if ByteTokenizer().image_token_id != BYTE_TOKENIZER_IMAGE_TOKEN_ID:
    raise AssertionError(f"ByteTokenizer.image_token_id {ByteTokenizer().image_token_id} != "
                         "nvlm.config.BYTE_TOKENIZER_IMAGE_TOKEN_ID "
                         f"{BYTE_TOKENIZER_IMAGE_TOKEN_ID}")


class HFTokenizer:
    """A `tokenizer.json` (HF `tokenizers` library) with NVLM's image and ChatML tokens.

    Text is encoded without the tokenizer's post-processor (`add_special_tokens=False`): the
    ChatML prompt already spells out every special token, and a BOS added by the post-processor
    would shift the labels. `eos_token_ids` are `<|im_end|>` and, if the vocabulary has it,
    `<|endoftext|>`; `pad_token_id` is `<|endoftext|>`, else `<|im_end|>`.
    """

    def __init__(self, tokenizer: Any, image_token: str | None = None,
                 source: str = "tokenizer") -> None:
        self._tokenizer = tokenizer
        self._source = source
        if image_token is None:
            image_token = next((t for t in IMAGE_TOKEN_CANDIDATES
                                if tokenizer.token_to_id(t) is not None), None)
            if image_token is None:
                raise InputError(
                    f"{source}: has none of the image placeholder tokens "
                    f"{list(IMAGE_TOKEN_CANDIDATES)}; pass image_token= with the placeholder "
                    "token of this vocabulary")
        self._image_token = image_token
        self._image_token_id = self._require_single_token(image_token, "image_token")
        self._im_start_id = self._require_single_token(IM_START, "ChatML token")
        self._im_end_id = self._require_single_token(IM_END, "ChatML token")
        self._endoftext_id = tokenizer.token_to_id(ENDOFTEXT)

    @classmethod
    def from_file(cls, path: str | Path, image_token: str | None = None) -> "HFTokenizer":
        """Load a `tokenizer.json` file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist")
        try:
            import tokenizers
        except ImportError as err:
            raise ImportError(
                f"loading {str(path)!r} needs the HF `tokenizers` library: "
                "pip install tokenizers") from err
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises plain Exception on malformed files
            raise InputError(f"{str(path)!r}: not a readable tokenizer.json ({err})") from err
        return cls(tokenizer, image_token=image_token, source=str(path))

    @classmethod
    def from_dir(cls, directory: str | Path, image_token: str | None = None) -> "HFTokenizer":
        """Load `directory/tokenizer.json` (the layout of HF checkpoints)."""
        return cls.from_file(Path(directory) / "tokenizer.json", image_token=image_token)

    def _require_single_token(self, token: str, what: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise InputError(f"{self._source}: {what} {token!r} is not in the vocabulary; NVLM "
                             f"prompts need it (ChatML: {IM_START!r} / {IM_END!r})")
        # A token that is in the vocabulary but not an added token would be split into pieces
        # when it appears in text, and placeholders would no longer map to one id each.
        encoded = self._tokenizer.encode(token, add_special_tokens=False).ids
        if encoded != [token_id]:
            raise InputError(f"{self._source}: {what} {token!r} encodes to {encoded}, expected "
                             f"the single id {token_id}; it must be an added (special) token")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def image_token(self) -> str:
        return self._image_token

    @property
    def image_token_id(self) -> int:
        return self._image_token_id

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self._endoftext_id is None:
            return (self._im_end_id,)
        return (self._im_end_id, self._endoftext_id)

    @property
    def pad_token_id(self) -> int:
        return self._im_end_id if self._endoftext_id is None else self._endoftext_id

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text: expected str, got {type(text).__name__}")
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(_as_int_list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def __repr__(self) -> str:
        return (f"HFTokenizer({self._source!r}, vocab_size={self.vocab_size}, "
                f"image_token={self._image_token!r})")


def find_image_token_id(directory: str | Path) -> int | None:
    """Id of the image placeholder in a checkpoint's tokenizer files, read as plain JSON.

    Looks in `tokenizer.json` (`added_tokens`, `model.vocab`), `tokenizer_config.json`
    (`added_tokens_decoder`) and `added_tokens.json` (InternVL2 ships one), and returns the id of
    `<|vision_pad|>`, else `<IMG_CONTEXT>`; None when there are no tokenizer files or neither
    token is in them. Needs no `tokenizers` library. A malformed file raises ValueError.
    """
    directory = Path(directory)
    vocab: dict[str, int] = {}
    for name in TOKENIZER_FILES:
        path = directory / name
        if path.is_file():
            vocab.update(_read_token_ids(path))
    for token in IMAGE_TOKEN_CANDIDATES:
        if token in vocab:
            return vocab[token]
    return None


def _read_token_ids(path: Path) -> dict[str, int]:
    """The token -> id pairs that one tokenizer file declares (only the kinds named above)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{str(path)!r}: not a readable JSON tokenizer file ({err})") from err
    if not isinstance(data, dict):
        raise InputError(f"{str(path)!r}: expected a JSON object, got {type(data).__name__}")
    ids: dict[str, int] = {}
    if path.name == "tokenizer.json":
        model_vocab = (data.get("model") or {}).get("vocab")
        if isinstance(model_vocab, dict):            # BPE / WordPiece / WordLevel
            ids.update({tok: int(i) for tok, i in model_vocab.items()})
        elif isinstance(model_vocab, list):          # Unigram: [[piece, score], ...]
            ids.update({entry[0]: i for i, entry in enumerate(model_vocab)})
        # Added tokens override the model's vocabulary, as in the tokenizers library.
        for entry in data.get("added_tokens") or []:
            ids[entry["content"]] = int(entry["id"])
    elif path.name == "tokenizer_config.json":
        for token_id, entry in (data.get("added_tokens_decoder") or {}).items():
            ids[entry["content"]] = int(token_id)
    else:                                            # added_tokens.json: {token: id}
        ids.update({tok: int(i) for tok, i in data.items()})
    return ids


def load_tokenizer(directory: str | Path | None = None) -> Tokenizer:
    """HFTokenizer for a directory with a `tokenizer.json`, else the built-in ByteTokenizer.

    A directory without `tokenizer.json` is one saved from a byte-level (tiny) model. If it holds
    other tokenizer files (a sentencepiece `tokenizer.model`, a slow `vocab.json`) this raises
    instead of falling back: the byte ids would not match that model's vocabulary.
    """
    if directory is None:
        return ByteTokenizer()
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer directory {str(directory)!r} does not exist")
    if (directory / "tokenizer.json").is_file():
        return HFTokenizer.from_dir(directory)
    other = sorted(p.name for p in directory.iterdir()
                   if p.name in ("tokenizer.model", "vocab.json", "merges.txt"))
    if other:
        raise InputError(f"{str(directory)!r}: has {other} but no tokenizer.json; only "
                         "tokenizer.json files are supported (convert with transformers' "
                         "AutoTokenizer(...).save_pretrained, which writes one)")
    return ByteTokenizer()


def _as_int_list(ids: Iterable[int] | Sequence[int]) -> list[int]:
    # Accept tensors and arrays without importing torch here.
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [int(i) for i in ids]
