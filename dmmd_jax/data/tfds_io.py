"""tensorflow-datasets splits as random-access data sources (array_record; no TensorFlow)."""

from dmmd_jax.data import types as data_types

EVAL_SPLITS = ("test", "validation")


def split(name: str, split: str, data_dir: str):
  """`tfds.data_source(name, split)` without downloading; DataError when it is not available."""
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise data_types.DataError(
        "tfds sources need tensorflow-datasets: pip install tensorflow-datasets") from e
  try:
    return tfds.data_source(
        name, split=split, data_dir=data_dir or None, download=False, try_gcs=False)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise data_types.DataError(
        f"{name!r} is not a tensorflow-datasets dataset (tfds.list_builders() lists them); use "
        "source='text_file' or 'npy' for other corpora.") from e
  except Exception as e:  # tfds raises many types for a dataset that is not prepared.
    where = data_dir or "the default tfds data dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
    raise data_types.DataError(
        f"tfds dataset {name!r} split {split!r} is not available in {where} as array_record "
        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Prepare it on a "
        f"machine with internet: `tfds build {name} --file_format=array_record"
        f"{' --data_dir=' + data_dir if data_dir else ''}` and copy the data dir here.") from e


def eval_split(name: str, data_dir: str):
  """The dataset's official "test" (else "validation") split, or None if it has neither."""
  for split_name in EVAL_SPLITS:
    try:
      return split(name, split_name, data_dir)
    except data_types.DataError as e:
      if not isinstance(e.__cause__, ValueError) or "Unknown split" not in str(e.__cause__):
        raise
  return None


def dataset_name(cfg) -> str:
  name = cfg.tfds_name
  if not name:
    raise data_types.DataError(f"source={cfg.source!r} needs tfds_name (e.g. 'lm1b', 'cifar10').")
  return name
