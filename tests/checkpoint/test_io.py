"""Reading user-supplied weight files: URL cache, clear errors naming the file."""

import pickle
import re

import pytest
import torch

from dinov2.checkpoint import CheckpointLoadError, load_weights_file


def _fake_downloads(monkeypatch, tmp_path, write=None):
    """No network: a URL "downloads" a state dict that says which URL it came from (or what
    ``write(url, dst)`` writes)."""
    downloads = []

    def download_url_to_file(url, dst, hash_prefix=None, progress=True):
        downloads.append(url)
        if write is not None:
            return write(url, dst)
        torch.save({"source": torch.tensor([len(url), sum(map(ord, url))])}, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download_url_to_file)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return downloads


def _expected(url):
    return torch.tensor([len(url), sum(map(ord, url))])


def test_urls_with_the_same_file_name_are_not_confused(tmp_path, monkeypatch):
    downloads = _fake_downloads(monkeypatch, tmp_path)
    small = "https://huggingface.co/facebook/dinov2-small/resolve/main/pytorch_model.bin"
    base = "https://huggingface.co/facebook/dinov2-base/resolve/main/pytorch_model.bin"
    assert torch.equal(load_weights_file(small)["source"], _expected(small))
    assert torch.equal(load_weights_file(base)["source"], _expected(base))  # not small's cached file
    assert torch.equal(load_weights_file(small)["source"], _expected(small))
    assert downloads == [small, base]  # each downloaded once


def test_official_weights_keep_their_torch_hub_cache_name(tmp_path, monkeypatch):
    downloads = _fake_downloads(monkeypatch, tmp_path)
    url = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"
    assert torch.equal(load_weights_file(url)["source"], _expected(url))
    assert (tmp_path / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth").is_file()  # shared with torch.hub
    load_weights_file(url)
    assert downloads == [url]


def test_truncated_weights_file_error_names_the_file(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(64)}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointLoadError, match=re.escape(str(path))):
        load_weights_file(path)
    broken = tmp_path / "weights.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointLoadError, match=re.escape(str(broken))):
        load_weights_file(broken)


class _Payload:
    def __reduce__(self):
        return (print, ("must not run",))


def test_refused_pickle_error_names_the_file(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(1), "x": _Payload()}, path)
    with pytest.raises(pickle.UnpicklingError, match=re.escape(str(path))):
        load_weights_file(path)


def test_a_directory_given_as_weights_is_named_as_a_directory(tmp_path):
    # A run's output folder passed where a weights file belongs said "weights file not found", for a
    # path that plainly exists.
    with pytest.raises(IsADirectoryError, match="directory") as info:
        load_weights_file(tmp_path)
    assert str(tmp_path) in str(info.value) and "not found" not in str(info.value)


def test_an_unknown_home_directory_is_a_missing_file():
    # Path.expanduser raised "RuntimeError: Could not determine home directory" for ~unknown_user.
    with pytest.raises(FileNotFoundError, match=re.escape("weights file not found: ~no_such_user_x1/w.pth")):
        load_weights_file("~no_such_user_x1/w.pth")


# ----------------------------------------------------------------------------- found by a mutation audit
def test_plain_http_urls_are_downloaded_and_a_url_without_a_file_name_gets_one(tmp_path, monkeypatch):
    downloads = _fake_downloads(monkeypatch, tmp_path)
    url = "http://intranet.example/weights/"
    assert torch.equal(load_weights_file(url)["source"], _expected(url))
    assert downloads == [url]
    assert [p.name for p in (tmp_path / "hub" / "checkpoints").rglob("*") if p.is_file()] == ["weights.pth"]


def test_a_home_relative_path_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    torch.save({"w": torch.ones(2)}, tmp_path / "mine.pth")
    assert torch.equal(load_weights_file("~/mine.pth")["w"], torch.ones(2))


def test_an_unreadable_download_is_named_with_its_url(tmp_path, monkeypatch):
    def cut_short(url, dst):
        torch.save({"w": torch.zeros(64)}, dst)
        with open(dst, "r+b") as f:
            f.truncate(100)  # a download cut short

    _fake_downloads(monkeypatch, tmp_path, write=cut_short)
    url = "https://example.org/models/vit.pth"
    with pytest.raises(
        CheckpointLoadError, match=re.escape(f"vit.pth (downloaded from {url}; delete it to download again)")
    ):
        load_weights_file(url)
