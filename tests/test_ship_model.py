"""tools/ship_model.py on a small GGUF (tests/test_gguf_checkpoint.py writes it): the parts and their
manifest, and `join` there, which names the parts missing or damaged and converts only once every
part is sound, to the checkpoint ensure() makes from the whole GGUF. (split's download of gguf's
wheel with pip is not run: tests download nothing.)"""

import hashlib
import sys

import pytest

from conftest import REPO, hf_config, random_tensors
from test_gguf_checkpoint import CASES, write_gguf
from weights import CHECKPOINT_FILES, EmbeddedModel
from weights.gguf_checkpoint import ensure

sys.path.insert(0, str(REPO / "tools"))
from ship_model import join, read_manifest, write_manifest, write_parts  # noqa: E402

PART_BYTES = 50_000


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """(spec, the GGUF, the ship folder with its parts and manifest, the checkpoint ensure() makes)."""
    root = tmp_path_factory.mktemp("ship")
    cfg = hf_config(architectures=["Qwen2ForCausalLM"], vocab_size=len(CASES["cut"]["tokens"]))
    write_gguf(root / "tiny.gguf", "qwen2", cfg, random_tensors(cfg, 0))
    spec = EmbeddedModel("Tiny", (), hashlib.sha256((root / "tiny.gguf").read_bytes()).hexdigest())
    folder = root / "ship"
    folder.mkdir()
    write_manifest(folder, spec, write_parts(root / "tiny.gguf", folder, PART_BYTES), "gguf-0.19.0-py3-none-any.whl")
    direct = ensure(spec, lambda line: None, gguf_file=root / "tiny.gguf", dest=root / "direct" / "Tiny")
    return spec, root / "tiny.gguf", folder, direct


def test_parts_and_manifest(shipped):
    spec, gguf_file, folder, _ = shipped
    manifest = read_manifest(folder)
    data = gguf_file.read_bytes()
    assert len(manifest["parts"]) == -(-len(data) // PART_BYTES) > 2
    assert b"".join((folder / p["file"]).read_bytes() for p in manifest["parts"]) == data
    assert all(p["bytes"] == PART_BYTES for p in manifest["parts"][:-1])
    assert (manifest["gguf_bytes"], manifest["gguf_sha256"]) == (len(data), spec.gguf_sha256)
    assert manifest["parts"][1]["sha256"] == hashlib.sha256(data[PART_BYTES:2 * PART_BYTES]).hexdigest()


def test_join_waits_for_every_part_and_then_converts(shipped, tmp_path):
    spec, _, shipped_folder, direct = shipped
    folder = tmp_path / "arrived"
    folder.mkdir()
    (folder / "manifest.json").write_bytes((shipped_folder / "manifest.json").read_bytes())
    parts = [p["file"] for p in read_manifest(folder)["parts"]]
    for name in parts[:-2]:
        (folder / name).write_bytes((shipped_folder / name).read_bytes())
    (folder / parts[1]).write_bytes((shipped_folder / parts[1]).read_bytes()[:-1])  # cut short in transit
    lines, dest = [], tmp_path / "models" / "Tiny"
    assert join(spec, folder, dest, lines.append) is None
    assert lines == [f"{folder}: {len(parts) - 3} of {len(parts)} parts here and sound; missing: {parts[-2]} "
                     f"{parts[-1]}; damaged: {parts[1]}"]
    assert not dest.exists()
    for name in (parts[1], *parts[-2:]):
        (folder / name).write_bytes((shipped_folder / name).read_bytes())
    assert join(spec, folder, dest, lambda line: None) == dest
    for name in CHECKPOINT_FILES:
        assert (dest / name).read_bytes() == (direct / name).read_bytes()
    assert not (folder / "model.gguf").exists()  # the joined GGUF is not kept
