import os
import pickle

import pytest
import torch

from hived import checkpoint
from hived.checkpoint import CheckpointError


def test_roundtrip_and_no_temp_files_left(tmp_path):
    path = tmp_path / "run" / "latest.pt"
    checkpoint.save({"step": 3, "model": {"w": torch.ones(2)}}, path)
    state = checkpoint.load(path)
    assert state["step"] == 3 and torch.equal(state["model"]["w"], torch.ones(2))
    assert os.listdir(path.parent) == ["latest.pt"]


def test_truncated_checkpoint_gets_a_clear_error(tmp_path):
    path = tmp_path / "latest.pt"
    checkpoint.save({"step": 1, "model": {"w": torch.randn(1000)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt.*best.pt"):
        checkpoint.load(path)


def corrupt_tensor_data(path, entry: str = "data/0") -> None:
    """Overwrite the middle of one tensor's stored bytes with NaNs, as a bad disk or a careless
    edit would, leaving the file a valid archive that torch loads without complaint."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(entry))
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
        start = info.header_offset + 30 + name_len + extra_len
        f.seek(start + info.file_size // 2)
        f.write(torch.full((16,), float("nan")).numpy().tobytes())


def test_corrupted_tensor_data_is_refused_with_a_clear_error(tmp_path):
    path = tmp_path / "latest.pt"
    checkpoint.save({"step": 1, "model": {"w": torch.randn(1000)}}, path)
    corrupt_tensor_data(path)
    with pytest.raises(CheckpointError, match="corrupt.*best.pt"):
        checkpoint.load(path)


def test_a_failed_write_leaves_the_old_file_intact(tmp_path):
    path = tmp_path / "latest.pt"
    checkpoint.save({"step": 1}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(Exception):
        checkpoint.save({"step": 2, "bad": Boom()}, path)
    assert checkpoint.load(path)["step"] == 1
    assert os.listdir(tmp_path) == ["latest.pt"]


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickled_objects_are_never_executed(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "hived-checkpoint", "version": 1, "x": Evil()}, path, pickle_protocol=2)
    with pytest.raises(CheckpointError, match="holds Python objects, which hived never loads") as err:
        checkpoint.load(path)
    assert "weights_only" not in str(err.value)  # torch's advice to unpickle it anyway is not passed on
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps({"format": "hived-checkpoint"}))
    with pytest.raises(CheckpointError):
        checkpoint.load(plain)


def test_foreign_files_are_named(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.ones(1)}, other)
    with pytest.raises(CheckpointError, match="not a hived checkpoint"):
        checkpoint.load(other)
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "missing.pt")
    text = tmp_path / "hostname"
    text.write_text("myhost\n")
    with pytest.raises(CheckpointError, match="is not a hived checkpoint; pass a .pt file"):
        checkpoint.load(text)
