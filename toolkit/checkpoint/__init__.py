"""Checkpoints on disk: `reader` opens (sharded) safetensors read-only, tensor by tensor;
`writer` streams planned shards into a directory that appears atomically."""
from ..atomic import atomic_dir
from .reader import (DTYPE_NAMES, DTYPES, INDEX, WEIGHT_SUFFIXES, Checkpoint, TensorInfo, fingerprint,
                     parse_dtype, read_header)
from .writer import ShardWriter, Spec, copy_side_files, parse_size, plan_shards, save_checkpoint

__all__ = ["DTYPE_NAMES", "DTYPES", "INDEX", "WEIGHT_SUFFIXES", "Checkpoint", "TensorInfo", "fingerprint",
           "parse_dtype", "read_header", "ShardWriter", "Spec", "copy_side_files", "parse_size",
           "plan_shards", "save_checkpoint", "atomic_dir"]
