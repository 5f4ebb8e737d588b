"""Conversations with images -> model inputs: prompt layout, tile tags, ChatML, labels.

    processor = NVLMProcessor.from_config(NVLMConfig.from_preset("tiny"))
    sample = processor([{"from": "human", "value": "<image>\nWhat is shown?"},
                        {"from": "gpt", "value": "A cat."}], images=["cat.jpg"])
    batch = pack_samples([sample, other_sample])      # nvlm.packing: one row with cu_seqlens

The images are tiled by nvlm.images (docs/nvlm.md section 2); the prompt layout follows
docs/nvlm.md section 6 for NVLM-D and section 8 for NVLM-X/H. The samples it builds are the
packed-batch contract's (nvlm.packing). Shapes: S is the tile side in pixels, N the number of
tiles of all images, L the number of tokens of a sample.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from nvlm.config import DEFAULT_THUMBNAIL_TAG, NVLMConfig, check_max_tiles
from .errors import InputError
from nvlm.images import (ImageSource, dynamic_tiles, image_size, image_to_tensor, load_image,
                         require_positive_int, tile_boxes)
from nvlm.packing import IGNORE_INDEX, ProcessedSample, XAttnSample
from nvlm.tokenizer import IM_END, IM_START, Tokenizer, load_tokenizer

IMAGE_PLACEHOLDER = "<image>"        # where an image goes in the user text
class SampleTooLong(InputError):
    """A sample that needs more tokens than the budget (`max_len`) it was built for."""


def tile_tags(num_tiles: int, thumbnail_tag: str = DEFAULT_THUMBNAIL_TAG,
              has_thumbnail: bool = True) -> list[str]:
    """The 1-D tile tags of docs/nvlm.md section 6, one per tile of an image.

    With a thumbnail: `<tile_1>` ... `<tile_{n-1}>` and the thumbnail tag last (a one-tile image
    gets only the thumbnail tag: its tile is the whole image). Without: `<tile_1>` ... `<tile_n>`.
    """
    require_positive_int(num_tiles, "num_tiles")
    if has_thumbnail:
        return [f"<tile_{k}>" for k in range(1, num_tiles)] + [thumbnail_tag]
    return [f"<tile_{k}>" for k in range(1, num_tiles + 1)]


# ---------------------------------------------------------------------------------------------
# Prompt layout and ChatML (docs/nvlm.md section 6)
# ---------------------------------------------------------------------------------------------

def image_prompt(num_tiles: int, tokens_per_tile: int, image_token: str,
                 thumbnail_tag: str = DEFAULT_THUMBNAIL_TAG, has_thumbnail: bool = True,
                 tagged: bool = True) -> str:
    """The NVLM-D text that replaces one `<image>`:

        <Image><tile_1>{image_token x tokens_per_tile}...<tile_global_thumbnail>{...}</Image>

    No separators: the released NVLM-D code concatenates exactly like this. tagged=False leaves the
    tile tags out (the paper's Table 1 "no tag" baseline): `<Image>{all tiles' tokens}</Image>`.
    """
    require_positive_int(tokens_per_tile, "tokens_per_tile")
    if not image_token:
        raise InputError(f"image_token: expected a non-empty string, got {image_token!r}")
    tiles = "".join((tag if tagged else "") + image_token * tokens_per_tile
                    for tag in tile_tags(num_tiles, thumbnail_tag, has_thumbnail))
    return f"<Image>{tiles}</Image>"


@dataclass
class ImageLayout:
    """Where one image with n tiles goes (tile indices 0..n-1 in dynamic_tiles' order).

    opening: decoder text before the image's span, seeing what the text before it sees (NVLM-X:
        `<Image>`, so that the tokens of `<tile_1>` depend on tile 1 alone, even through the
        decoder's self-attention).
    pieces: the rest of the decoder text that replaces `<image>`, as (text, tile) pieces: `tile`
        is the tile whose tag the piece is (NVLM-X: its tokens see only that tile), else -1.
    decoder_tiles: the tiles whose rows fill the placeholders of `pieces`, in order.
    memory_tiles: the tiles that make up the image's X-attn memory, in order.
    memory_tags: NVLM-H, the tag text before each memory tile (embedded into the memory); else [].
    """

    opening: str
    pieces: list[tuple[str, int]]
    decoder_tiles: list[int]
    memory_tiles: list[int] = dataclasses.field(default_factory=list)
    memory_tags: list[str] = dataclasses.field(default_factory=list)


def image_layout(arch: str, num_tiles: int, tokens_per_tile: int, image_token: str,
                 thumbnail_tag: str = DEFAULT_THUMBNAIL_TAG,
                 has_thumbnail: bool = True, tagged: bool = True) -> ImageLayout:
    """docs/nvlm.md sections 6 and 8, per architecture:

    - D: `<Image>` + per tile its tag and placeholders + `</Image>` (image_prompt), every tile in
      the decoder;
    - X: `<Image>` + the tags alone + `</Image>` in the decoder; every tile in the memory, tag k's
      tokens tied to tile k;
    - H: `<Image>` + the thumbnail tag and the thumbnail's placeholders + `</Image>` in the
      decoder; the regular tiles in the memory, each after its embedded tag. [our choice] Without
      a thumbnail tile (use_thumbnail off) the decoder span is `<Image></Image>`; a one-tile
      image is its own thumbnail and has no memory.

    tagged=False (NVLM-D only): no tile tags, the paper's Table 1 "no tag" baseline.
    """
    if not tagged and arch != "D":
        raise InputError(f"tagged: False is for arch 'D' only (NVLM-{arch} ties its tags to "
                         "tiles)")
    tags = tile_tags(num_tiles, thumbnail_tag, has_thumbnail)
    tiles = list(range(num_tiles))
    if arch == "D":
        return ImageLayout("", [(image_prompt(num_tiles, tokens_per_tile, image_token,
                                              thumbnail_tag, has_thumbnail, tagged), -1)], tiles)
    if arch == "X":
        return ImageLayout("<Image>", [*zip(tags, tiles), ("</Image>", -1)], [], tiles)
    if arch == "H":
        regular = tiles[:-1] if has_thumbnail else tiles
        thumbnail = tiles[len(regular):]
        span = "".join(tags[t] + image_token * tokens_per_tile for t in thumbnail)
        return ImageLayout("", [(f"<Image>{span}</Image>", -1)], thumbnail, regular,
                           [tags[t] for t in regular])
    raise InputError(f"arch: expected 'D', 'X' or 'H', got {arch!r}")


_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
          "system": "system"}


def normalize_conversation(conversation: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """Turns as (role, text) with role in user / assistant / system.

    Accepts LLaVA/InternVL turns `{"from": "human"|"gpt"|"system", "value": ...}` and OpenAI-style
    `{"role": "user"|"assistant"|"system", "content": ...}`.
    """
    if isinstance(conversation, (str, bytes)) or not isinstance(conversation, Sequence):
        raise TypeError(f"conversation: expected a list of turns (dicts), "
                        f"got {type(conversation).__name__}")
    turns = []
    for i, turn in enumerate(conversation):
        if not isinstance(turn, Mapping):
            raise TypeError(f"conversation[{i}]: expected a dict, got {type(turn).__name__}")
        role = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if not isinstance(role, str) or role not in _ROLES:
            raise InputError(f"conversation[{i}]: expected 'from' in human/gpt/system or 'role' "
                             f"in user/assistant/system, got {role!r}")
        if not isinstance(text, str):
            raise TypeError(f"conversation[{i}]: expected the text ('value' or 'content') to be "
                            f"a str, got {type(text).__name__}")
        turns.append((_ROLES[role], text))
    return turns


def chatml_header(role: str) -> str:
    return f"{IM_START}{role}\n"


def chatml(turns: Iterable[tuple[str, str]], add_generation_prompt: bool = False) -> str:
    """`<|im_start|>{role}\\n{text}<|im_end|>\\n` per turn, then `<|im_start|>assistant\\n` when
    add_generation_prompt."""
    text = "".join(f"{chatml_header(role)}{body}{IM_END}\n" for role, body in turns)
    return text + (chatml_header("assistant") if add_generation_prompt else "")


# ---------------------------------------------------------------------------------------------
# The processor
# ---------------------------------------------------------------------------------------------

class NVLMProcessor:
    """Tokenizes conversations with images into a ProcessedSample (docs/nvlm.md sections 2 and 6).

    Tile size, max tiles, thumbnail, thumbnail tag and tokens per tile come from the config.
    `max_tiles` may be overridden per call (pretraining uses 1: one 1x1 tile, no thumbnail).
    """

    def __init__(self, tokenizer: Tokenizer, config: NVLMConfig) -> None:
        if tokenizer.image_token_id != config.image_token_id:
            raise InputError(
                f"tokenizer.image_token_id: expected config.image_token_id "
                f"{config.image_token_id}, got {tokenizer.image_token_id} "
                f"({tokenizer.image_token!r}); the model would put image rows on the wrong ids")
        if tokenizer.vocab_size > config.llm.vocab_size:
            raise InputError(f"tokenizer.vocab_size: expected at most config.llm.vocab_size "
                             f"{config.llm.vocab_size}, got {tokenizer.vocab_size}")
        self.tokenizer = tokenizer
        self.config = config
        # What the processor writes around and inside an image span (docs/nvlm.md section 6).
        self._markup = re.compile(r"</?Image>|<tile_\d+>|" + re.escape(config.thumbnail_tag))

    @classmethod
    def from_config(cls, config: NVLMConfig, tokenizer: Tokenizer | None = None) -> "NVLMProcessor":
        """With the built-in ByteTokenizer when no tokenizer is given (the tiny preset)."""
        return cls(tokenizer if tokenizer is not None else load_tokenizer(), config)

    @property
    def tile_size(self) -> int:
        return self.config.tile_size

    @property
    def tokens_per_tile(self) -> int:
        return self.config.tokens_per_tile

    def image_layout(self, num_tiles: int) -> ImageLayout:
        """Where one `<image>` with `num_tiles` tiles goes, for this config's architecture."""
        # A lone tile is the whole image, so it is tagged as the thumbnail even when
        # use_thumbnail is off (the released code tags every last tile that way).
        has_thumbnail = self.config.use_thumbnail or num_tiles == 1
        return image_layout(self.config.arch, num_tiles, self.tokens_per_tile,
                            self.tokenizer.image_token, thumbnail_tag=self.config.thumbnail_tag,
                            has_thumbnail=has_thumbnail, tagged=self.config.tile_tags)

    def __call__(self, conversations: Sequence[Mapping[str, Any]],
                 images: ImageSource | Sequence[ImageSource] | None = None,
                 max_tiles: int | None = None, max_len: int | None = None) -> ProcessedSample:
        """A training sample from one conversation (a list of turns, see normalize_conversation).

        Each `<image>` in the user turns is replaced, in order, by the next image's tiles (its
        prompt layout); with images but no `<image>` at all, `<image>\n` is prepended to the
        first user turn. Placeholders and images must then match one to one (ValueError with
        both counts otherwise), and the image token itself may not appear as text. Labels are
        IGNORE_INDEX except on the assistant answers and their closing `<|im_end|>`; a
        conversation without an assistant turn has no labelled token.

        max_len: the sample's token budget (a packed row), or None. Over it, SampleTooLong is
        raised; images are decoded one at a time, and not at all when their headers already
        show that their decoder tokens alone exceed the budget.
        """
        return self._build(normalize_conversation(conversations), images, max_tiles,
                           add_generation_prompt=False, max_len=max_len)

    def prompt(self, question: str, images: ImageSource | Sequence[ImageSource] | None = None,
               max_tiles: int | None = None, system: str | None = None) -> ProcessedSample:
        """A generation prompt: [system turn,] the user turn, then `<|im_start|>assistant\\n`."""
        if not isinstance(question, str):
            raise TypeError(f"question: expected str, got {type(question).__name__}")
        turns = ([("system", system)] if system is not None else []) + [("user", question)]
        return self._build(turns, images, max_tiles, add_generation_prompt=True)

    def _build(self, turns: list[tuple[str, str]],
               images: ImageSource | Sequence[ImageSource] | None, max_tiles: int | None,
               add_generation_prompt: bool, max_len: int | None = None) -> ProcessedSample:
        images = _as_image_list(images)
        max_tiles = check_max_tiles(self.config.max_tiles if max_tiles is None else max_tiles)
        if max_len is not None:
            require_positive_int(max_len, "max_len")
        if self.config.arch != "D" and max_tiles > self.config.max_tiles:
            # NVLM-X/H size their tile tags and X-attn memory by the preset
            raise InputError(f"max_tiles: expected at most config.max_tiles "
                             f"({self.config.max_tiles}) for NVLM-{self.config.arch}, got "
                             f"{max_tiles}")
        image_token = self.tokenizer.image_token
        for i, (_, text) in enumerate(turns):
            if image_token in text:
                raise InputError(
                    f"conversation[{i}]: contains the image token {image_token!r} as text; it "
                    f"is reserved for image rows (write {IMAGE_PLACEHOLDER!r} where an image goes)")
            tag = self._markup.search(text) if self.config.arch != "D" else None
            if tag:
                # NVLM-X/H tie the tokens of these tags to tiles: text that spells one out would
                # be a tag the processor cannot match to any tile
                raise InputError(
                    f"conversation[{i}]: contains the image markup {tag.group(0)!r} as text; the "
                    f"processor writes the image spans and tile tags itself (write "
                    f"{IMAGE_PLACEHOLDER!r} where an image goes)")

        num_placeholders = sum(text.count(IMAGE_PLACEHOLDER) for role, text in turns
                               if role == "user")
        if images and num_placeholders == 0:
            first_user = next((i for i, (role, _) in enumerate(turns) if role == "user"), None)
            if first_user is None:
                raise InputError(f"conversation: {len(images)} image(s) given but there is no "
                                 "user turn to put them in")
            turns = list(turns)
            turns[first_user] = ("user", f"{IMAGE_PLACEHOLDER}\n{turns[first_user][1]}")
            num_placeholders = 1
        if num_placeholders != len(images):
            raise InputError(f"conversation: {num_placeholders} {IMAGE_PLACEHOLDER!r} "
                             f"placeholder(s) in the user turns but {len(images)} image(s) given; "
                             "they must match one to one")
        if max_len is not None:
            self._check_image_budget(images, max_tiles, max_len)

        tiles: list[Image.Image] = []
        num_tiles: list[int] = []
        for image in images:
            # Decoded one at a time: only the tiles outlive the loop, not the full-size image.
            image_tiles = dynamic_tiles(load_image(image), self.tile_size, max_tiles,
                                        self.config.use_thumbnail)
            tiles.extend(image_tiles)
            num_tiles.append(len(image_tiles))

        layouts = [self.image_layout(n) for n in num_tiles]
        first_tiles = np.cumsum([0] + num_tiles[:-1]).tolist() if num_tiles else []
        tokens = _Tokens()
        next_image = 0
        for role, text in turns:
            if role != "user" or IMAGE_PLACEHOLDER not in text:
                self._append_turn(role, [(text, -1, -1)], tokens)
                continue
            parts = text.split(IMAGE_PLACEHOLDER)
            segments = [(parts[0], -1, -1)]
            for part in parts[1:]:
                layout, base = layouts[next_image], first_tiles[next_image]
                segments.append((layout.opening, -1, -1))
                segments += [(piece, next_image, base + tile if tile >= 0 else -1)
                             for piece, tile in layout.pieces]
                segments.append((part, -1, -1))
                next_image += 1
            if self.config.arch == "D":
                # One string, as the released NVLM-D code tokenizes it.
                segments = [("".join(piece for piece, _, _ in segments), -1, -1)]
            self._append_turn(role, segments, tokens)
        if add_generation_prompt:
            tokens.add(self.tokenizer.encode(chatml_header("assistant")), labelled=False)

        if max_len is not None and len(tokens.ids) > max_len:
            # Truncating would cut image placeholders or answers: the caller drops the sample.
            raise SampleTooLong(f"sample: {len(tokens.ids)} tokens > row of {max_len}")
        input_ids = torch.tensor(tokens.ids, dtype=torch.int64)
        decoder_tiles = [base + t for layout, base in zip(layouts, first_tiles)
                         for t in layout.decoder_tiles]
        expected = len(decoder_tiles) * self.tokens_per_tile
        found = int((input_ids == self.tokenizer.image_token_id).sum())
        if found != expected:
            # Only a tokenizer that splits or merges the image token can get here.
            raise InputError(f"input_ids: expected {expected} image tokens ({len(decoder_tiles)} "
                             f"tile(s) in the decoder x {self.tokens_per_tile} per tile), found "
                             f"{found}")
        if tiles:
            pixel_values = image_to_tensor(tiles)
        else:
            pixel_values = torch.empty(0, 3, self.tile_size, self.tile_size, dtype=torch.float32)
        xattn = None
        if self.config.arch != "D":
            xattn = self._xattn_sample(tokens, layouts, first_tiles, decoder_tiles)
        return ProcessedSample(input_ids=input_ids,
                               labels=torch.tensor(tokens.labels, dtype=torch.int64),
                               pixel_values=pixel_values, num_tiles=num_tiles,
                               num_image_tokens=expected, xattn=xattn)

    def _check_image_budget(self, images: list[ImageSource], max_tiles: int,
                            max_len: int) -> None:
        """SampleTooLong if the images alone need more than max_len decoder tokens, found from
        their headers (image_size) before any pixel is decoded. A lower bound, so a sample that
        fits is never refused: per image the smaller count of the two orientations (EXIF may
        turn the image on decoding), and at least one token (NVLM-X: the tags' text)."""
        needed = 0
        for i, image in enumerate(images):
            width, height = image_size(image)
            needed += max(1, min(self._decoder_image_tokens(w, h, max_tiles)
                                 for w, h in ((width, height), (height, width))))
            if needed > max_len:
                raise SampleTooLong(f"images: the first {i + 1} of {len(images)} need at least "
                                    f"{needed} tokens, more than a row of {max_len}")

    def _decoder_image_tokens(self, width: int, height: int, max_tiles: int) -> int:
        """Placeholders in the decoder for a width x height image (NVLM-X: none)."""
        num_tiles = len(tile_boxes(width, height, self.tile_size, max_tiles,
                                   self.config.use_thumbnail))
        return len(self.image_layout(num_tiles).decoder_tiles) * self.tokens_per_tile

    def _xattn_sample(self, tokens: "_Tokens", layouts: list[ImageLayout],
                      first_tiles: list[int], decoder_tiles: list[int]) -> XAttnSample:
        memory_tiles, memory_ids, memory_sizes = [], [], []
        placeholders = [self.tokenizer.image_token_id] * self.tokens_per_tile
        for layout, base in zip(layouts, first_tiles):
            memory_tiles += [base + t for t in layout.memory_tiles]
            size = len(layout.memory_tiles) * self.tokens_per_tile
            for tag in layout.memory_tags:   # NVLM-H: embed(<tile_k>) before tile k
                tag_ids = self.tokenizer.encode(tag)
                memory_ids += tag_ids + placeholders
                size += len(tag_ids)
            memory_sizes.append(size)
        as_tensor = lambda values: torch.tensor(values, dtype=torch.int64)  # noqa: E731
        h = self.config.arch == "H"
        return XAttnSample(image_index=as_tensor(tokens.image_index),
                           tile_index=None if h else as_tensor(tokens.tile_index),
                           decoder_tiles=decoder_tiles, memory_tiles=memory_tiles,
                           memory_ids=as_tensor(memory_ids) if h else None,
                           memory_sizes=memory_sizes, tokens_per_tile=self.tokens_per_tile)

    def _append_turn(self, role: str, segments: list[tuple[str, int, int]],
                     tokens: "_Tokens") -> None:
        """One ChatML turn whose body is `segments` (text, image, tile), each encoded on its own
        (NVLM-X/H: so every token knows which image span and tile tag it belongs to)."""
        # Header, body and the closing newline are encoded separately: the model generates an
        # answer from right after `<|im_start|>assistant\n`, so training sees the answer's tokens
        # exactly as generation produces them (no BPE merge across the header), and the
        # label boundaries are exact token boundaries.
        answer = role == "assistant"
        tokens.add(self.tokenizer.encode(chatml_header(role)), labelled=False)
        text, image, tile = segments[-1]    # always text: an image span is followed by text
        segments = [*segments[:-1], (text + IM_END, image, tile)]
        for text, image, tile in segments:
            tokens.add(self.tokenizer.encode(text), labelled=answer, image=image, tile=tile)
        tokens.add(self.tokenizer.encode("\n"), labelled=False)


@dataclass
class _Tokens:
    """The ids of a sample as they are built, with their labels and X-attn indices."""

    ids: list[int] = dataclasses.field(default_factory=list)
    labels: list[int] = dataclasses.field(default_factory=list)
    image_index: list[int] = dataclasses.field(default_factory=list)
    tile_index: list[int] = dataclasses.field(default_factory=list)

    def add(self, ids: list[int], labelled: bool, image: int = -1, tile: int = -1) -> None:
        self.ids += ids
        self.labels += ids if labelled else [IGNORE_INDEX] * len(ids)
        self.image_index += [image] * len(ids)
        self.tile_index += [tile] * len(ids)


def _as_image_list(images: ImageSource | Sequence[ImageSource] | None) -> list[ImageSource]:
    if images is None:
        return []
    if isinstance(images, (str, Path, bytes, bytearray, memoryview, Image.Image)):
        return [images]
    if not isinstance(images, Sequence):
        raise TypeError(f"images: expected None, an image or a list of images, "
                        f"got {type(images).__name__}")
    return list(images)
