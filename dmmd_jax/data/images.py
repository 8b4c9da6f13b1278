"""Images as pixel tokens: Fashion-MNIST, scikit-learn digits, tfds image datasets; class labels.

Pixels are flattened row-major over (H, W, C), so L = H·W·C, and quantised to K = `levels` grey
levels (0 = the source's native number). Eval = the official test split, else the last
`eval_fraction` of the images.
"""

import gzip
import os

import numpy as np

from dmmd_jax.data import splits, tfds_io
from dmmd_jax.data import types as data_types

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
LABEL_SOURCES = ("digits", "fashion_mnist")


def read_idx(path: str) -> np.ndarray:
  """Reads a gzipped idx file (MNIST format) of unsigned bytes."""
  with gzip.open(path, "rb") as f:
    data = f.read()
  ndim = data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
  if data[2] != 0x08:
    raise data_types.DataError(
        f"{path}: expected unsigned-byte idx data, got type code {data[2]:#x}.")
  return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist(cfg):
  """Fashion-MNIST uint8 [N, 28, 28, 1] train / test, from Debian's package or tfds."""
  files = {s: os.path.join(FASHION_MNIST_DIR, f"{p}-images-idx3-ubyte.gz")
           for s, p in (("train", "train"), ("test", "t10k"))}
  if all(os.path.isfile(f) for f in files.values()):
    return tuple(read_idx(files[s])[..., None] for s in ("train", "test"))
  data_dir, max_examples = cfg.tfds_data_dir, cfg.max_examples
  try:
    return tuple(_tfds_images(tfds_io.split("fashion_mnist", s, data_dir), max_examples)
                 for s in ("train", "test"))
  except data_types.DataError as e:
    raise data_types.DataError(
        f"Fashion-MNIST is neither in {FASHION_MNIST_DIR} (Debian: apt-get install "
        f"dataset-fashion-mnist) nor in tfds: {e}") from e


def _tfds_images(source, max_examples: int) -> np.ndarray:
  """The "image" fields of a tfds data source, uint8 [N, H, W, C]."""
  n = min(len(source), max_examples) if max_examples > 0 else len(source)
  images = np.stack([np.asarray(source[i]["image"]) for i in range(n)])
  if images.dtype != np.uint8:
    raise data_types.DataError(f"tfds images must be uint8 (256 levels), got {images.dtype}.")
  return images if images.ndim == 4 else images[..., None]


def quantise(images: np.ndarray, native: int, levels: int) -> np.ndarray:
  """Flattens [N, H, W, C] images with values in [0, native) to int32 [N, H·W·C] in [0, levels)."""
  flat = images.reshape(len(images), -1).astype(np.int32)
  return flat if levels == native else flat * levels // native


def _levels(cfg, native: int) -> int:
  levels = cfg.levels or native
  if not 2 <= levels <= native:
    raise data_types.DataError(
        f"levels must lie in [2, {native}] for this source (0 = native), got {levels}.")
  return levels


def _image_arrays(cfg):
  """(train [N, H, W, C], eval [M, H, W, C] or None, native number of levels)."""
  source = cfg.source
  if source == "fashion_mnist":
    return *_fashion_mnist(cfg), 256
  if source == "digits":
    from sklearn.datasets import load_digits
    return load_digits().images.astype(np.int64).reshape(-1, 8, 8, 1), None, 17
  name, data_dir = tfds_io.dataset_name(cfg), cfg.tfds_data_dir
  max_examples = cfg.max_examples
  train = _tfds_images(tfds_io.split(name, "train", data_dir), max_examples)
  eval_src = tfds_io.eval_split(name, data_dir)
  evals = _tfds_images(eval_src, max_examples) if eval_src is not None else None
  return train, evals, 256


def load_images(cfg):
  """Image pixels as tokens; eval = the official test split, else the last `eval_fraction`."""
  train, evals, native = _image_arrays(cfg)
  if evals is None:
    frac = cfg.eval_fraction
    n_eval = int(len(train) * frac)
    if frac > 0 and n_eval == 0:
      raise data_types.DataError(
          f"eval_fraction={frac} of {len(train)} images holds out no images.")
    train, evals = train[: len(train) - n_eval], train[len(train) - n_eval:]
  levels = splits.check_vocab(cfg, _levels(cfg, native))
  h, w, c = (int(d) for d in train.shape[1:])
  info = data_types.DataInfo(kind="image", vocab_size=levels, seq_len=h * w * c,
                             image_shape=(h, w, c))
  max_examples = cfg.max_examples
  train, evals = splits.cap(train, max_examples), splits.cap(evals, max_examples)
  return quantise(train, native, levels), quantise(evals, native, levels), info


def _read_idx_labels(path: str) -> np.ndarray:
  """uint8 labels `[n]` of a gzipped idx1 file."""
  with gzip.open(path, "rb") as f:
    raw = f.read()
  if raw[2] != 0x08 or raw[3] != 1:
    raise data_types.DataError(f"{path} is not an idx1 unsigned-byte label file.")
  count = int.from_bytes(raw[4:8], "big")
  return np.frombuffer(raw, np.uint8, count=count, offset=8).astype(np.int32)


def load_labels(data_cfg):
  """Class labels (train `[N]`, eval `[M]`) aligned with `data.load_dataset(data_cfg)`'s rows.

  digits: sklearn's targets, split like data.py (eval = the last eval_fraction); fashion_mnist:
  the Debian package's idx label files (train / t10k). Both capped by max_examples.
  """
  source, cap = data_cfg.source, data_cfg.max_examples
  if source == "digits":
    from sklearn.datasets import load_digits

    labels = load_digits().target.astype(np.int32)
    n_eval = int(len(labels) * data_cfg.eval_fraction)
    train, evals = labels[:len(labels) - n_eval], labels[len(labels) - n_eval:]
  elif source == "fashion_mnist":
    files = [os.path.join(FASHION_MNIST_DIR, f"{p}-labels-idx1-ubyte.gz")
             for p in ("train", "t10k")]
    if not all(os.path.isfile(f) for f in files):
      raise data_types.DataError(f"Fashion-MNIST labels need {files[0]} and {files[1]} "
                                 "(apt-get install dataset-fashion-mnist).")
    train, evals = (_read_idx_labels(f) for f in files)
  else:
    raise data_types.DataError(f"the feature net needs class labels; data.source must be one of "
                               f"{LABEL_SOURCES}, got {source!r}.")
  return (train[:cap], evals[:cap]) if cap > 0 else (train, evals)
