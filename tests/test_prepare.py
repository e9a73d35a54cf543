"""`metatrain prepare`: counts on the real Omniglot, atomic/idempotent writes, corrupt-store detection, bad inputs."""

from __future__ import annotations

import json
import shutil
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import png_bytes, write_tiny_omniglot
from metatrain.tasks import sources
from metatrain.tasks import store as store_mod
from metatrain.tasks.errors import DataError, MetatrainError
from metatrain.tasks.prepare import prepare_imagefolder, prepare_omniglot
from metatrain.tasks.store import TaskStore, verify_store
from PIL import Image

# sha256 of the shared archives, as their README lists them.
SHARED_SHA = {
    "images_background.zip": "316ade0c9fc52e455adf52d79890ecb065cbc43469e275f913898e1c65857f09",
    "images_evaluation.zip": "351987e19cfb4dc9096fc5903f8ea0f12930777db426dac282412e81b00f6df5",
}


@pytest.mark.data
def test_real_omniglot_counts_and_manifest(omniglot_store, omniglot_dir):
    m = json.loads((omniglot_store / "_manifest.json").read_text())
    assert m["splits"]["background"]["classes"] == 964
    assert m["splits"]["evaluation"]["classes"] == 659
    assert m["splits"]["background"]["alphabets"] == 30
    assert m["splits"]["evaluation"]["alphabets"] == 20
    assert m["images"] == 32_460 and m["classes"] == 1623
    assert m["image_shape"] == [1, 28, 28]
    assert m["sources"] == SHARED_SHA
    assert sorted(m["files"]) == ["split=background/part-0.parquet", "split=evaluation/part-0.parquet"]
    store = TaskStore.open(omniglot_store)
    assert store.images.shape == (32_460, 1, 28, 28) and store.images.dtype == torch.uint8
    assert store.images.is_contiguous()
    assert (store.class_sizes == 20).all()
    assert store.class_split.count("background") == 964
    # Class ids follow (split, alphabet, character) order: stable for the same archives.
    assert store.class_names[0] == "Alphabet_of_the_Magi/character01"
    assert store.class_split[963] == "background" and store.class_split[964] == "evaluation"


@pytest.mark.data
def test_real_pixels_are_ink_high_and_match_the_png(omniglot_store, omniglot_dir):
    """A stored image equals the member PNG decoded independently (PIL), inverted and resized."""
    table = pq.read_table(omniglot_store / "split=evaluation" / "part-0.parquet")
    row = table.slice(123, 1).to_pylist()[0]
    with zipfile.ZipFile(omniglot_dir / "images_evaluation.zip") as zf:
        raw = np.asarray(Image.open(zf.open(row["source_file"])).convert("L"), dtype=np.float32)
    assert raw.shape == (105, 105)
    ink = torch.from_numpy(255.0 - raw)[None, None]
    expect = torch.nn.functional.interpolate(ink, size=(28, 28), mode="bilinear", antialias=True,
                                             align_corners=False).round().clamp(0, 255)
    got = torch.tensor(row["image"], dtype=torch.float32).view(28, 28)
    assert got.shape == (28, 28)
    assert (got - expect[0, 0]).abs().max() <= 1.0
    store = TaskStore.open(omniglot_store)
    assert store.images[:, 0, 0, 0].float().mean() < 1.0  # corners are background: no ink
    assert 0 < store.images.float().mean() < 64  # strokes are a small, bright minority


def test_zip_and_unpacked_sources_give_identical_stores(tmp_path):
    a = write_tiny_omniglot(tmp_path / "zipped")
    b = write_tiny_omniglot(tmp_path / "unpacked", unpacked=True)
    sa = TaskStore.open(prepare_omniglot(a, tmp_path / "sa").path)
    sb = TaskStore.open(prepare_omniglot(b, tmp_path / "sb").path)
    assert sa.class_names == sb.class_names == tuple(
        f"{al}/character{c:02d}" for al in ("Alpha", "Beta", "Gamma") for c in (1, 2, 3))
    assert torch.equal(sa.images, sb.images)
    assert sa.class_split == ("background",) * 6 + ("evaluation",) * 3


def test_second_run_does_nothing(tiny_source, tmp_path):
    out = tmp_path / "store"
    first = prepare_omniglot(tiny_source, out)
    assert first.rebuilt and first.reason == "new store"
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    second = prepare_omniglot(tiny_source, out)
    assert not second.rebuilt and "up to date" in second.reason
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps


def test_changed_settings_or_source_rebuild(tiny_source, tmp_path):
    out = tmp_path / "store"
    prepare_omniglot(tiny_source, out, size=28)
    r = prepare_omniglot(tiny_source, out, size=14)
    assert r.rebuilt and "image_shape" in r.reason
    assert TaskStore.open(out).images.shape[-1] == 14
    write_tiny_omniglot(tiny_source, seed=1)  # same names, new drawings
    r = prepare_omniglot(tiny_source, out, size=14)
    assert r.rebuilt and "sources" in r.reason


def _part(out):
    return out / "split=background" / "part-0.parquet"


def test_truncated_file_is_detected_and_rebuilt(tiny_source, tmp_path):
    out = tmp_path / "store"
    prepare_omniglot(tiny_source, out)
    data = _part(out).read_bytes()
    _part(out).write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="part-0.parquet has .* bytes"):
        TaskStore.open(out)
    r = prepare_omniglot(tiny_source, out)
    assert r.rebuilt and "corrupt" in r.reason
    assert TaskStore.open(out).images.shape[0] == 9 * 20


def test_same_size_corruption_fails_the_checksum(tiny_source, tmp_path):
    out = tmp_path / "store"
    prepare_omniglot(tiny_source, out)
    data = bytearray(_part(out).read_bytes())
    data[len(data) // 2] ^= 0xFF
    _part(out).write_bytes(bytes(data))
    with pytest.raises(DataError, match="sha256"):
        verify_store(out)


def test_missing_extra_and_manifest_mismatch(tiny_source, tmp_path):
    out = tmp_path / "store"
    prepare_omniglot(tiny_source, out)
    shutil.copy(_part(out), out / "split=background" / "part-1.parquet")
    with pytest.raises(DataError, match="unexpected"):
        verify_store(out)
    (out / "split=background" / "part-1.parquet").unlink()
    mf = json.loads((out / "_manifest.json").read_text())
    mf["files"]["split=background/part-0.parquet"]["rows"] += 1
    (out / "_manifest.json").write_text(json.dumps(mf))
    with pytest.raises(DataError, match="manifest says"):
        verify_store(out)
    (out / "_manifest.json").unlink()
    with pytest.raises(DataError, match="_manifest.json is missing"):
        TaskStore.open(out)
    assert prepare_omniglot(tiny_source, out).rebuilt  # a manifest-less store is ours: rebuilt
    verify_store(out)


def test_interrupted_rebuild_keeps_the_old_store(tiny_source, tmp_path, monkeypatch):
    out = tmp_path / "store"
    prepare_omniglot(tiny_source, out, size=28)
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    calls = {"n": 0}
    real = store_mod.decode_class

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(store_mod, "decode_class", failing)
    with pytest.raises(KeyboardInterrupt):
        prepare_omniglot(tiny_source, out, size=14)
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "store"]  # no partial folder left behind
    verify_store(out)


def test_refuses_to_replace_a_folder_that_is_not_a_store(tiny_source, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="not a metatrain store"):
        prepare_omniglot(tiny_source, out)
    assert (out / "thesis.tex").read_text() == "precious"


def test_missing_source_folder_and_archive(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        prepare_omniglot(tmp_path / "nope", tmp_path / "out")
    src = write_tiny_omniglot(tmp_path / "src")
    (src / "images_evaluation.zip").unlink()
    with pytest.raises(DataError, match="images_evaluation.zip is missing"):
        prepare_omniglot(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_corrupt_zip_names_the_archive(tiny_source, tmp_path):
    (tiny_source / "images_background.zip").write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(DataError, match="images_background.zip is not a readable zip"):
        prepare_omniglot(tiny_source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_undecodable_png_names_the_member(tmp_path):
    src = write_tiny_omniglot(tmp_path / "src", unpacked=True)
    bad = src / "images_evaluation" / "Gamma" / "character02" / "0102_07.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="cannot decode image images_evaluation/Gamma/character02/0102_07.png"):
        prepare_omniglot(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


@pytest.mark.parametrize("size", [0, -3])
def test_bad_size(tiny_source, tmp_path, size):
    with pytest.raises(MetatrainError, match="--size must be a positive integer"):
        prepare_omniglot(tiny_source, tmp_path / "out", size=size)


def _write_imagefolder(root, rng):
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    for i in range(4):
        (root / "cat" / f"{i}.png").write_bytes(png_bytes(rng, side=10 + i, channels=3))
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (12, 8, 3), dtype=np.uint8)).save(root / "dog" / f"{i}.jpg")


def test_imagefolder_rgb_with_uneven_classes(tmp_path):
    src = tmp_path / "imgs"
    _write_imagefolder(src, np.random.default_rng(0))
    r = prepare_imagefolder(src, tmp_path / "store", size=16, channels=3)
    assert r.rebuilt
    s = TaskStore.open(r.path)
    assert s.images.shape == (10, 3, 16, 16)
    assert s.class_names == ("cat", "dog") and s.class_split == ("all", "all")
    assert s.class_sizes.tolist() == [4, 6]
    assert not prepare_imagefolder(src, tmp_path / "store", size=16, channels=3).rebuilt


def test_imagefolder_bad_inputs(tmp_path):
    src = tmp_path / "imgs"
    _write_imagefolder(src, np.random.default_rng(0))
    (src / "dog" / "notes.txt").write_text("not an image")  # refused with its name, never silently left out
    with pytest.raises(DataError, match="dog/notes.txt is not an image"):
        prepare_imagefolder(src, tmp_path / "store")
    (src / "dog" / "notes.txt").unlink()
    (src / "dog" / ".DS_Store").write_bytes(b"\0")  # hidden names are skipped
    (src / "dog" / "3.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="cannot decode image dog/3.jpg"):
        prepare_imagefolder(src, tmp_path / "store")
    (src / "dog" / "3.jpg").unlink()
    (src / "empty").mkdir()
    with pytest.raises(DataError, match="empty holds no images"):
        prepare_imagefolder(src, tmp_path / "store")
    with pytest.raises(MetatrainError, match="--channels"):
        prepare_imagefolder(src, tmp_path / "store", channels=2)
    with pytest.raises(DataError, match="does not exist"):
        prepare_imagefolder(tmp_path / "none", tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_sources_sha_tree_changes_with_content(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("1")
    h1 = sources.sha256_tree(tmp_path / "a")
    (tmp_path / "a" / "x").write_text("2")
    assert sources.sha256_tree(tmp_path / "a") != h1


def test_a_store_reads_as_a_parquet_dataset_and_an_older_store_is_renamed(tiny_source, tmp_path):
    """The manifest's leading '_' makes pandas and pyarrow skip it: the store folder is a plain hive dataset."""
    import pandas as pd
    import pyarrow.dataset as ds

    out = tmp_path / "store"
    m = prepare_omniglot(tiny_source, out).manifest
    frame = pd.read_parquet(out)
    assert len(frame) == m["images"] and set(frame["split"]) == {"background", "evaluation"}
    table = ds.dataset(out, format="parquet", partitioning="hive").to_table()
    assert table.num_rows == m["images"] and "image" in table.column_names
    # A store written before the rename (manifest.json) is still read, and the next prepare renames its manifest.
    (out / "_manifest.json").rename(out / "manifest.json")
    with pytest.raises(pa.ArrowInvalid):
        pd.read_parquet(out)  # what the old name did to every Parquet reader
    TaskStore._cache.clear()
    assert TaskStore.open(out).images.shape[0] == m["images"]
    again = prepare_omniglot(tiny_source, out)
    assert not again.rebuilt and "renamed its manifest.json to _manifest.json" in again.reason
    assert (out / "_manifest.json").is_file() and not (out / "manifest.json").exists()
    assert len(pd.read_parquet(out)) == m["images"]
