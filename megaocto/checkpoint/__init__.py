"""Checkpoint on-disk format, below training/, convert/ and generation/ (none of which import each other for it).

``from megaocto import checkpoint as ckpt`` gives the whole format API (see format.py for the layout).
"""
from megaocto.checkpoint.format import (FORMAT, FORMAT_VERSION, METADATA, MODEL_FILE, TRACKER, fsync_dir,
                                        iter_dir_name, list_checkpoints, load_checkpoint, model_file,
                                        rank_dir_name, read_metadata, read_tracker, resolve_dir, save_checkpoint,
                                        write_file_atomic, writes_model_files)
from megaocto.checkpoint.reader import (CheckpointError, checkpoint_info, config_from_metadata, load_model_state,
                                        saved_dtype, stage_model_files)

__all__ = ["FORMAT", "FORMAT_VERSION", "METADATA", "MODEL_FILE", "TRACKER", "fsync_dir", "iter_dir_name",
           "list_checkpoints", "load_checkpoint", "model_file", "rank_dir_name", "read_metadata", "read_tracker",
           "resolve_dir", "save_checkpoint", "write_file_atomic", "writes_model_files", "CheckpointError",
           "checkpoint_info", "config_from_metadata", "load_model_state", "saved_dtype", "stage_model_files"]
