"""Reading DCP chunks (sources/distcp.py, DcpTensorReader): bytes read once, verified, viewed without a copy.

The checkpoints are written by `torch.distributed.checkpoint.save` in this process (no process group).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import MetadataIndex

from distfinalize.errors import SourceError
from distfinalize.sources.dcp import DcpSource
from distfinalize.sources.dcp_metadata import load_metadata
from distfinalize.sources.distcp import TAIL_BYTES, BufferFile, ChunkError, load_chunk, stored_crc, zip_records

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def saved(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    state = {
        "w": torch.randn(64, 48, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16),
        "b": torch.arange(48, dtype=torch.float32),
        "idx": torch.arange(10, dtype=torch.int64),
    }
    dcp.save({k: v.clone() for k, v in state.items()}, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    return tmp_path / "ckpt", state


def storage_of(path: Path, key: str):  # the _StorageInfo DCP recorded for a tensor's only chunk
    metadata = load_metadata(path)
    return metadata.storage_data[MetadataIndex(key, (0,) * len(metadata.state_dict_metadata[key].size))]


def test_reads_every_tensor_bit_exact_and_single_chunks_without_a_copy(tmp_path: Path) -> None:
    path, state = saved(tmp_path)
    out = DcpSource(path).reader().read(list(state))
    for key, tensor in state.items():
        assert out[key].dtype == tensor.dtype and torch.equal(out[key], tensor)
    w = out["w"]  # one chunk: a view into the bytes read (the buffer also holds the zip records)
    assert w.untyped_storage().nbytes() > w.numel() * w.element_size()
    assert w.storage_offset() > 0


def test_a_flipped_data_byte_is_a_checksum_error_naming_the_file(tmp_path: Path) -> None:
    path, _ = saved(tmp_path)
    info = storage_of(path, "w")
    file = path / info.relative_path
    data = bytearray(file.read_bytes())
    data[info.offset + info.length - 2000] ^= 0x10  # inside the storage record, before the zip's tail
    file.write_bytes(bytes(data))
    with pytest.raises(SourceError) as caught:
        DcpSource(path).reader().read(["w"])
    message = str(caught.value)
    assert "corrupt" in message and "checksum mismatch" in message and info.relative_path in message


def test_a_truncated_file_says_so(tmp_path: Path) -> None:
    path, _ = saved(tmp_path)
    info = storage_of(path, "w")
    (path / info.relative_path).write_bytes((path / info.relative_path).read_bytes()[: info.offset + 100])
    with pytest.raises(SourceError, match="truncated"):
        DcpSource(path).reader().read(["w"])


def test_a_chunk_of_another_dtype_than_metadata_says_is_refused(tmp_path: Path) -> None:
    path, state = saved(tmp_path)
    metadata = pickle.loads((path / ".metadata").read_bytes())
    metadata.state_dict_metadata["w"].properties.dtype = torch.float16  # same size as bfloat16: only the header tells
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(SourceError, match=r"holds torch.bfloat16 \[64, 48\] where .metadata says torch.float16"):
        DcpSource(path).reader().read(["w"])
    assert torch.equal(DcpSource(path).reader().read(["b"])["b"], state["b"])  # other tensors still read


def test_load_chunk_copies_an_unusual_layout_instead_of_viewing_it() -> None:
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # strides (1, 4): not contiguous
    raw = io.BytesIO()
    torch.save(tensor, raw)
    buffer = torch.frombuffer(bytearray(raw.getvalue()), dtype=torch.uint8)
    out = load_chunk(buffer, "test", torch.float32, (4, 3))
    assert torch.equal(out, tensor)
    records = zip_records(memoryview(buffer.numpy()), "test")
    assert any(r.name.endswith("/data/0") and r.size == 48 for r in records)


def test_a_record_that_is_not_a_torch_save_zip_is_refused() -> None:
    with pytest.raises(ChunkError, match=r"not a torch\.save record"):
        load_chunk(torch.zeros(64, dtype=torch.uint8), "x.distcp bytes 0-64", torch.float32, (4,))


def test_buffer_file_reads_and_seeks_like_a_file() -> None:
    data = bytes(range(100))
    f = BufferFile(memoryview(data))
    assert f.read(5) == data[:5]
    assert f.seek(-10, io.SEEK_END) == 90 and f.read() == data[90:]
    assert f.seek(3) == 3 and f.tell() == 3 and f.read(2) == data[3:5]


def test_read_rows_gives_those_rows_of_each_tensor(tmp_path: Path) -> None:
    path, state = saved(tmp_path)
    reader = DcpSource(path).reader()
    for key, tensor in state.items():
        for start, stop in ((0, 1), (3, 10), (tensor.shape[0] - 2, tensor.shape[0])):
            assert torch.equal(reader.read_rows(key, start, stop), tensor[start:stop]), key


def test_the_stored_crc_comes_from_the_record_tail_alone(tmp_path: Path) -> None:
    path, state = saved(tmp_path)
    info = storage_of(path, "w")
    record = (path / info.relative_path).read_bytes()[info.offset : info.offset + info.length]
    [storage] = [r for r in zip_records(memoryview(record), "w") if r.name.endswith("/data/0")]
    tail = memoryview(record)[-TAIL_BYTES:]
    assert info.length > TAIL_BYTES and stored_crc(tail, info.length, state["w"].nbytes) == storage.crc
    assert stored_crc(tail, info.length, state["w"].nbytes + 2) is None  # not exactly the tensor's bytes
    assert stored_crc(tail[-100:], info.length, state["w"].nbytes) is None  # the directory starts before the tail
    source = DcpSource(path)
    assert source.reader().stored_crcs(list(source.chunks()["w"])) == [storage.crc]
