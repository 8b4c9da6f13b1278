"""Samples for people: token rows decoded to text, image tokens tiled into a PNG grid."""


import math
import pathlib

import numpy as np

from dmmd_jax.data import tokenizers
from dmmd_jax.data import types as data_types

_GRID_MAX = 64


def dump_samples(info: data_types.DataInfo, tokens, path_stem: str) -> str:
  """Write samples `[n, L]` as text (path_stem.txt) or a PNG grid (path_stem.png); the path."""
  tokens = np.asarray(tokens)
  if info.kind == "image":
    path = path_stem + ".png"
    save_image_grid(info, tokens, path)
    return path
  path = path_stem + ".txt"
  with open(path, "w") as f:
    f.write("\n\n=====\n\n".join(decode_text(info, tokens)))
  return path


def _decode_row(tok: tokenizers.Tokenizer | None, row: np.ndarray, vocab: int, unknown: str) -> str:
  """Decodes one row; ids outside [0, vocab) (e.g. a mask id) become one `unknown` each."""
  if tok is None:
    return " ".join(str(int(i)) for i in row)
  valid = (row >= 0) & (row < vocab)
  runs = np.split(row, np.flatnonzero(np.diff(valid)) + 1)
  return "".join(tok.decode(run) if 0 <= run[0] < vocab else unknown * len(run)
                 for run in runs if len(run))


def decode_text(info: data_types.DataInfo, tokens: np.ndarray, *, unknown: str = "□") -> list[str]:
  """Decodes token rows int [N, L] to N strings.

  Ids outside [0, K) (such as a mask id K) are shown as `unknown`, one per token. Untokenised
  data (npy) is shown as space-separated ids.
  """
  if info.kind != "text":
    raise data_types.DataError(f"decode_text needs text data, got kind={info.kind!r}.")
  tok = tokenizers.tokenizer_from_spec(info.tokenizer) if info.tokenizer else None
  tokens = np.atleast_2d(np.asarray(tokens))
  return [_decode_row(tok, row, info.vocab_size, unknown) for row in tokens]


def image_grid(info: data_types.DataInfo, tokens: np.ndarray, *, pad: int = 1) -> np.ndarray:
  """Tiles the first (up to 64) images of token rows int [N, H·W·C] into uint8 [GH, GW, C].

  Grey levels [0, K) are rescaled to [0, 255] and ids outside it clipped; padding is grey 128.
  """
  if info.kind != "image":
    raise data_types.DataError(f"image grid needs image data, got kind={info.kind!r}.")
  h, w, c = info.image_shape
  images = np.clip(np.asarray(tokens)[:_GRID_MAX], 0, info.vocab_size - 1).reshape(-1, h, w, c)
  images = (images * 255 // (info.vocab_size - 1)).astype(np.uint8)
  cols = math.ceil(math.sqrt(len(images)))
  rows = math.ceil(len(images) / cols)
  grid = np.full([rows * (h + pad) + pad, cols * (w + pad) + pad, c], 128, np.uint8)
  for i, image in enumerate(images):
    y, x = (pad + k * (size + pad) for k, size in zip(divmod(i, cols), (h, w), strict=True))
    grid[y:y + h, x:x + w] = image
  return grid


def save_image_grid(info: data_types.DataInfo, tokens: np.ndarray, path: str, *,
                    scale: int = 0) -> None:
  """Writes a PNG grid of the first (up to 64) images of token rows int [N, H·W·C].

  Args:
    info: image `DataInfo`.
    tokens: int [N, H·W·C] pixel tokens.
    path: output .png path (parent folders are created).
    scale: integer upscaling factor; 0 picks one that makes each image at least ~64 px.
  """
  from PIL import Image

  grid = image_grid(info, tokens)
  scale = scale or max(1, 64 // max(info.image_shape[:2]))
  grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
  pathlib.Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
