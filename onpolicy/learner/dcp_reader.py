"""Loading a learner group's `torch.distributed.checkpoint` folder without running a pickle.

torch's own reader unpickles the folder's `.metadata` with plain `pickle.load`, and its default planner
reads every non-tensor entry (the optimiser's param groups: floats, tuples) with
`torch.load(weights_only=False)`: a crafted checkpoint runs code either way. `load_dcp` reads the same
folder with `SafeReader`, whose unpickler builds only DCP's metadata classes, `torch.Size`, dtypes,
layouts and paths, and `SafePlanner`, which loads byte entries with `weights_only=True` (tensors and
plain data). Tensor entries torch already loads with `weights_only=True`.
"""

from __future__ import annotations

import collections
import io
import pathlib
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    ("pathlib", "PosixPath"): pathlib.PosixPath,
    ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
    ("collections", "OrderedDict"): collections.OrderedDict,
}
_METADATA_CLASSES = {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                     "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == _METADATA_MODULE and name in _METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch.distributed.checkpoint.filesystem" and name == "_StorageInfo":
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"DCP metadata names {module}.{name}, which a checkpoint's metadata never "
                                     "holds: refusing to load it (a crafted or foreign checkpoint)")


def read_metadata(data: bytes) -> Metadata:
    """DCP metadata from its pickle bytes, building only the classes such metadata holds."""
    metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    if not isinstance(metadata, Metadata):
        raise pickle.UnpicklingError(f"DCP metadata is a {type(metadata).__name__}, not Metadata")
    return metadata


class SafeReader(FileSystemReader):
    """`FileSystemReader` whose metadata goes through `read_metadata`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = read_metadata(f.read())
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """`DefaultLoadPlanner` that loads non-tensor entries with `weights_only=True`."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def load_dcp(state: dict[str, Any], folder: str) -> None:
    """`torch.distributed.checkpoint.load(state, checkpoint_id=folder)`, through the safe reader and planner."""
    import torch.distributed.checkpoint as dcp

    # Read here first: inside dcp.load an error reading the metadata becomes an AssertionError about a
    # missing per-rank file, which would hide why the checkpoint was refused.
    read_metadata((pathlib.Path(folder) / ".metadata").read_bytes())
    try:
        dcp.load(state, storage_reader=SafeReader(folder), planner=SafePlanner())
    except dcp.api.CheckpointException as err:  # a BaseException: the resume's fallback would not catch it
        causes = [exc for exc, _trace in err.failures.values()]
        refused = [e for e in causes if isinstance(e, pickle.UnpicklingError)]
        if refused:  # say why in one line, not as every rank's traceback
            why = str(refused[0]).strip().splitlines()[-1]
            raise pickle.UnpicklingError(f"{folder}: an entry is not tensors and plain data (weights_only "
                                         f"unpickling refused it: {why}); refusing to load it") from None
        first = causes[0] if causes else err
        raise ValueError(f"{folder}: torch.distributed.checkpoint could not load it: {type(first).__name__}: "
                         f"{str(first).strip().splitlines()[-1] if str(first).strip() else ''}") from None
