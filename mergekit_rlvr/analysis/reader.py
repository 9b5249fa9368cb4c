"""Streaming reader of ``mergekit-rlvr analyze``.

Models are resolved the way mergekit resolves them (``ModelReference`` for Hugging
Face ids, ``ShardedTensorIndex`` for a local directory, sharded or not) and read as
row slices of their safetensors files: each slice is its own read-only mapping of the
file's pages (``MAP_POPULATE``: the pages are read and mapped when the slice is made,
in the background thread), so the kernels read the page cache itself, with no copy,
and the resident memory is the slices in flight, never a whole tensor or model (a
slice's mapping goes with its last tensor). Where a file cannot be mapped the slice
is read with ``pread`` instead. A background thread makes the next slices while the
kernels work on the current one.

Only tensors present in the base and in every MODEL with the same shape are
analyzed (the others are listed under "skipped" with the reason), so every vector
and pair is measured over the same entries.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Dict, Iterator, List, Sequence, Tuple

import torch

from mergekit_rlvr.errors import UserError

#: entries per chunk (float32 intermediates of a few times 16 MB; 1 Mi entries measured
#: no faster in bench/analyze_speed.py, 256 Ki slower: per-chunk histogram updates)
CHUNK_ENTRIES = 1 << 22

_TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _TORCH_DTYPES[_name] = getattr(torch, _attr)


class SafetensorsFile:
    """A safetensors file read in row slices: a read-only mapping of each slice's pages
    (``pread`` where mapping fails); memory holds only the slices in use."""

    def __init__(self, path: str, mapped: bool = True):
        self.path = path
        self.mapped = mapped  # False: every slice is read with pread (a copy of its bytes)
        self.fd = os.open(path, os.O_RDONLY)
        head = os.pread(self.fd, 8, 0)
        if len(head) != 8:
            raise ValueError("file shorter than a safetensors header")
        size = int.from_bytes(head, "little")
        if size > 100_000_000:
            raise ValueError(f"implausible header size {size}")
        header = json.loads(os.pread(self.fd, size, 8))
        header.pop("__metadata__", None)
        self.data_start = 8 + size
        self.entries = header
        length = os.fstat(self.fd).st_size
        for name, entry in header.items():  # a mapping past the end would crash on reading (SIGBUS)
            if self.data_start + entry["data_offsets"][1] > length:
                raise ValueError(f"tensor {name} ends past the end of the file ({length} bytes): truncated?")

    def __del__(self, _close=os.close):  # os may be gone at interpreter exit
        fd = getattr(self, "fd", None)
        if fd is not None:
            _close(fd)

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> str:
        return self.entries[name]["dtype"]

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        entry = self.entries[name]
        dtype = _TORCH_DTYPES[entry["dtype"]]
        shape = entry["shape"]
        begin, end = entry["data_offsets"]
        rows = shape[0] if shape else 1
        row_bytes = (end - begin) // max(rows, 1)
        count = (stop - start) * row_bytes
        offset = self.data_start + begin + start * row_bytes
        buffer = _mapped(self.fd, offset, count) if count and self.mapped else None
        if buffer is None:
            buffer = self._pread(name, offset, count)
        out = buffer.view(dtype)
        return out.reshape(shape) if not shape else out.reshape(stop - start, *shape[1:])

    def _pread(self, name: str, offset: int, count: int) -> torch.Tensor:
        buffer = torch.empty(count, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        got = 0
        while got < count:
            n = os.preadv(self.fd, [view[got:]], offset + got)
            if n <= 0:
                raise OSError(f"{self.path}: unexpected end of file in tensor {name}")
            got += n
        return buffer


_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # Linux: read and map every page now
_first_mapping = threading.Lock()
_warned = False


def _mapped(fd: int, offset: int, count: int):
    """``count`` bytes of the file from ``offset`` as a uint8 tensor over a private
    read-only mapping (no copy; unmapped when the tensor goes), or None where the file
    cannot be mapped. Nothing writes to it: the kernels only read their inputs."""
    global _warned
    low = offset - offset % mmap.ALLOCATIONGRANULARITY
    try:
        pages = mmap.mmap(fd, offset - low + count, flags=mmap.MAP_PRIVATE | _POPULATE, prot=mmap.PROT_READ,
                          offset=low)
    except (OSError, ValueError, TypeError, AttributeError):  # (Windows: no MAP_PRIVATE, another signature)
        return None
    if _warned:
        return torch.frombuffer(pages, dtype=torch.uint8, offset=offset - low, count=count)
    with _first_mapping, warnings.catch_warnings():  # torch warns once that the buffer is not writable
        warnings.simplefilter("ignore", UserWarning)
        _warned = True
        return torch.frombuffer(pages, dtype=torch.uint8, offset=offset - low, count=count)


class Source:
    """One checkpoint: tensor name -> safetensors file, read in row slices (``mapped``:
    see :class:`SafetensorsFile`)."""

    def __init__(self, arg: str, mapped: bool = True):
        self.arg = arg
        path = resolve(arg)
        try:
            from mergekit.io.lazy_tensor_loader import ShardedTensorIndex
            from safetensors import SafetensorError  # e.g. a truncated file

            index = ShardedTensorIndex.from_disk(path)
        except (RuntimeError, OSError, ValueError, KeyError, SafetensorError) as error:
            raise UserError(f"model {arg}: no readable checkpoint at {path} ({error})") from None
        if not index.is_safetensors:
            raise UserError(f"model {arg}: only safetensors checkpoints can be streamed (found pytorch .bin files)")
        self._files: Dict[str, SafetensorsFile] = {}
        self.where: Dict[str, SafetensorsFile] = {}
        for name, shard in index.tensor_paths.items():
            file = os.path.join(index.base_path, shard)
            if file not in self._files:
                try:
                    self._files[file] = SafetensorsFile(file, mapped)
                except (OSError, ValueError) as error:
                    raise UserError(f"model {arg}: {file} is not a readable safetensors file: {error}") from None
            if name not in self._files[file].entries:
                raise UserError(f"model {arg}: tensor {name} is listed in the index but not in {file}")
            self.where[name] = self._files[file]
        self.order = {file: i for i, file in enumerate(sorted(self._files))}

    def names(self) -> List[str]:
        """Tensor names in file order (one shard after the other, by offset)."""
        return sorted(self.where, key=lambda n: (self.order[self.where[n].path],
                                                 self.where[n].entries[n]["data_offsets"][0]))

    def shape(self, name: str) -> Tuple[int, ...]:
        return self.where[name].shape(name)

    def dtype(self, name: str) -> str:
        return self.where[name].dtype(name)

    def read(self, name: str, start: int, stop: int, scalar: bool) -> torch.Tensor:
        file = self.where[name]
        try:
            return file.read_rows(name, 0, 1) if scalar else file.read_rows(name, start, stop)
        except (OSError, KeyError, RuntimeError) as error:
            raise UserError(f"model {self.arg}: tensor {name} is unreadable in {file.path}: {error}") from None


def resolve(arg: str) -> str:
    """Local path of a model argument, downloading a Hugging Face id like mergekit."""
    if os.path.exists(arg):
        return arg  # local: skip importing mergekit.common (peft, transformers: seconds)
    if os.path.isabs(arg) or arg.startswith(".") or arg.split("@")[0].count("/") > 1:
        raise UserError(f"model {arg}: no such directory (and not a Hugging Face id like owner/name)")
    from mergekit.common import ModelReference

    try:
        reference = ModelReference.parse(arg)
    except Exception as error:
        raise UserError(f"model {arg}: not a model path or Hugging Face id ({error})") from None
    if reference.lora is not None:
        raise UserError(f"model {arg}: LoRA adapters are not supported by analyze (merge it first)")
    if os.path.exists(reference.model.path):
        return reference.model.path
    try:
        return reference.local_path()
    except Exception as error:  # huggingface_hub raises many kinds
        raise UserError(f"model {arg}: not a local directory and not downloadable ({type(error).__name__}: {error})") from None


FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


@dataclass
class Plan:
    names: List[str]
    shapes: Dict[str, Tuple[int, ...]]
    skipped: List[Dict[str, str]]


def plan(base: Source, models: Sequence[Source]) -> Plan:
    """Tensors present in the base and every model with equal shapes; the rest skipped."""
    names, shapes, skipped = [], {}, []
    model_names = [set(m.where) for m in models]
    for name in base.names():
        shape = base.shape(name)
        reasons = []
        if base.dtype(name) not in FLOAT_DTYPES:
            skipped.append({"tensor": name, "model": base.arg, "reason": f"not floating point ({base.dtype(name)})"})
            continue
        for model, present in zip(models, model_names):
            if name not in present:
                reasons.append({"tensor": name, "model": model.arg, "reason": "missing in the model"})
            elif model.shape(name) != shape:
                reasons.append({"tensor": name, "model": model.arg,
                                "reason": f"shape {list(model.shape(name))} differs from the base's {list(shape)}"})
            elif model.dtype(name) not in FLOAT_DTYPES:
                reasons.append({"tensor": name, "model": model.arg, "reason": f"not floating point ({model.dtype(name)})"})
        if reasons:
            skipped.extend(reasons)
            continue
        names.append(name)
        shapes[name] = shape
    base_names = set(base.where)
    for model in models:
        for name in sorted(set(model.where) - base_names):
            skipped.append({"tensor": name, "model": model.arg, "reason": "missing in the base"})
    return Plan(names, shapes, skipped)


def _slices(shape: Tuple[int, ...], chunk_entries: int) -> List[Tuple[int, int]]:
    """Row ranges of at most ``chunk_entries`` entries (at least one row)."""
    row = math.prod(shape[1:])
    step = max(1, chunk_entries // max(row, 1))
    return [(start, min(shape[0], start + step)) for start in range(0, shape[0], step)]


def chunks(plan_: Plan, base: Source, models: Sequence[Source], chunk_entries: int = CHUNK_ENTRIES
           ) -> Iterator[Tuple[str, torch.Tensor, List[torch.Tensor]]]:
    """(name, base chunk, [model chunks]) row slices of at most ``chunk_entries`` entries
    (at least one row)."""
    for name in plan_.names:
        shape = plan_.shapes[name]
        if not shape:
            yield name, base.read(name, 0, 1, True), [m.read(name, 0, 1, True) for m in models]
            continue
        for start, stop in _slices(shape, chunk_entries):
            yield name, base.read(name, start, stop, False), [m.read(name, start, stop, False) for m in models]


def sample(plan_: Plan, base: Source, models: Sequence[Source], every: int, chunk_entries: int
           ) -> Iterator[Tuple[str, torch.Tensor, List[torch.Tensor], float]]:
    """Every ``every``-th row slice of each tensor (its first included), with the weight
    (tensor entries / sampled entries) that makes the sample stand for the tensor."""
    for name in plan_.names:
        shape = plan_.shapes[name]
        if not shape:
            yield name, base.read(name, 0, 1, True), [m.read(name, 0, 1, True) for m in models], 1.0
            continue
        picked = _slices(shape, chunk_entries)[::every]
        weight = shape[0] / sum(stop - start for start, stop in picked)
        for start, stop in picked:
            yield (name, base.read(name, start, stop, False), [m.read(name, start, stop, False) for m in models],
                   weight)


def prefetch(iterator, depth: int = 2):
    """Run ``iterator`` in a background thread, ``depth`` items ahead: file reads
    (``mmap`` and ``pread`` release the GIL) overlap the kernels' work on the previous chunk."""
    import queue

    items: "queue.Queue" = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work():
        try:
            for item in iterator:
                while not stop.is_set():
                    try:
                        items.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            items.put((done, None))
        except BaseException as error:  # re-raised in the consumer
            items.put((done, error))

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item[0] is done:
                if item[1] is not None:
                    raise item[1]
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                items.get_nowait()
            except queue.Empty:
                thread.join(0.05)
