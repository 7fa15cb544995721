from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from helpers.embeddings import EmbeddingError, read_embeddings, write_embeddings
from helpers.encoders import SlicePreprocess, image_encoder
from helpers.encoders.randconv import RandomConvEncoder


def test_round_trip_with_tokens_and_metadata(tmp_path):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(3, 4)).astype(np.float32)
    tokens = [rng.normal(size=(k, 4)).astype(np.float32) for k in (2, 3, 1)]
    path = write_embeddings(tmp_path / "e.parquet", ["a", "b", "c"], emb, tokens=tokens, metadata={"encoder": "x"})
    table = read_embeddings(path)
    assert table.metadata == {"encoder": "x", "dim": 4}
    np.testing.assert_array_equal(table.embedding, emb)
    assert [t.shape for t in table.tokens] == [(2, 4), (3, 4), (1, 4)]
    schema = pq.read_schema(path)
    assert pa.types.is_fixed_size_list(schema.field("embedding").type)
    aligned = table.align(["c", "a"])
    np.testing.assert_array_equal(aligned.embedding, emb[[2, 0]])
    with pytest.raises(EmbeddingError, match=r"2 of 3 cohort studies have no embedding, e.g. d, e"):
        table.align(["a", "d", "e"])


def test_bad_tables_are_refused_with_counts(tmp_path):
    emb = np.ones((3, 2), dtype=np.float32)
    emb[1, 0] = np.nan
    write_embeddings(tmp_path / "bad.parquet", ["a", "a", "b"], emb)
    with pytest.raises(EmbeddingError, match=r"1 duplicated study_id, e.g. a; 1 row\(s\) with NaN"):
        read_embeddings(tmp_path / "bad.parquet")
    pq.write_table(pa.table({"study_id": ["a"], "vector": [[1.0]]}), tmp_path / "cols.parquet")
    with pytest.raises(EmbeddingError, match="missing column 'embedding'"):
        read_embeddings(tmp_path / "cols.parquet")
    pq.write_table(pa.table({"study_id": ["a", "b"], "embedding": [[1.0, 2.0], [1.0]]}), tmp_path / "ragged.parquet")
    with pytest.raises(EmbeddingError, match="different or empty lengths"):
        read_embeddings(tmp_path / "ragged.parquet")


def test_randconv_is_frozen_seeded_and_differentiable():
    a, b = RandomConvEncoder(seed=1), RandomConvEncoder(seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not any(p.requires_grad for p in a.parameters())
    x = torch.rand(2, 1, 64, 64, requires_grad=True)
    a(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="unknown image encoder 'dino'"):
        image_encoder("dino")


def test_slice_preprocess_windows_and_resamples():
    hu = np.full((30, 40, 40), -1000.0, dtype=np.float32)
    hu[:, 10:30, 10:30] = 40.0
    out = SlicePreprocess(window_hu=(-125.0, 225.0), n_slices=8, size=32, fov_mm=None, slab_mm=None)(hu)
    assert out.shape == (8, 1, 32, 32)
    assert float(out.min()) == 0.0 and abs(float(out.max()) - 165 / 350) < 1e-6
    with pytest.raises(ValueError, match="voxel spacing is needed"):
        SlicePreprocess(window_hu=(-125.0, 225.0))(hu)


def test_slice_preprocess_harmonises_scanners():
    """Air calibration, field of view and slab thickness: the same phantom from a scanner
    with a +20 HU offset, 5.5 mm pixels and 3 mm slices preprocesses like the reference
    (5 mm slices, 6 mm pixels) up to interpolation; without them it does not."""
    from helpers.imaging import Volume, air_offset

    def phantom(n_xy: int, pixel: float, n_z: int, slice_mm: float, offset: float) -> Volume:
        y, x = (np.mgrid[:n_xy, :n_xy] - (n_xy - 1) / 2) * pixel
        body = (x / 120.0) ** 2 + (y / 90.0) ** 2 <= 1.0
        hu = np.where(body, 40.0, -1000.0).astype(np.float32)[None].repeat(n_z, axis=0) + offset
        return Volume(hu=hu, spacing=(slice_mm, pixel, pixel))

    reference = phantom(64, 6.0, 20, 5.0, 0.0)
    other = phantom(70, 5.5, 33, 3.0, 20.0)
    assert air_offset(other.hu) == 20.0 and air_offset(reference.hu) == 0.0
    prep = SlicePreprocess(window_hu=(-125.0, 225.0), n_slices=8, size=64)
    a, b = prep(reference), prep(other)
    assert a.shape == b.shape == (8, 1, 64, 64)
    assert float((a - b).abs().mean()) < 0.006  # edge interpolation only (0.004 measured)
    naive = SlicePreprocess(window_hu=(-125.0, 225.0), n_slices=8, size=64, calibrate_air=False, fov_mm=None,
                            slab_mm=None)
    assert float((naive(reference) - naive(other)).abs().mean()) > 3 * float((a - b).abs().mean())  # 0.016


def test_token_copy_is_read_instead_of_the_column_and_only_while_it_matches(tmp_path, monkeypatch):
    import helpers.embeddings as he

    rng = np.random.default_rng(3)
    emb = rng.normal(size=(4, 3)).astype(np.float32)
    tokens = [rng.normal(size=(5, 3)).astype(np.float32) for _ in range(4)]
    path = write_embeddings(tmp_path / "e.parquet", list("abcd"), emb, tokens=tokens, metadata={"encoder": "x"})
    copies = sorted(tmp_path.glob("e.tokens-*.npy"))
    assert len(copies) == 1
    # the column keeps the tokens: the table stands alone
    column = pq.read_table(path, columns=["tokens"]).column("tokens").to_pylist()
    np.testing.assert_array_equal(np.asarray(column, dtype=np.float32), np.stack(tokens))
    calls = []
    real = he._token_lists
    monkeypatch.setattr(he, "_token_lists", lambda *a: calls.append(1) or real(*a))
    table = read_embeddings(path)
    assert calls == [] and table.metadata == {"encoder": "x", "dim": 3}  # from the copy; its name is not metadata
    np.testing.assert_array_equal(table.token_array(), np.stack(tokens))
    # a rewrite replaces the copy and removes the old one
    tokens2 = [t + 1 for t in tokens]
    write_embeddings(path, list("abcd"), emb, tokens=tokens2)
    assert [c.exists() for c in copies] == [False] and len(list(tmp_path.glob("e.tokens-*.npy"))) == 1
    np.testing.assert_array_equal(read_embeddings(path).token_array(), np.stack(tokens2))
    assert calls == []
    # rows reordered by another tool (metadata kept): the copy no longer matches, the column is read
    reordered = pq.read_table(path).take([3, 2, 1, 0])
    pq.write_table(reordered, path)  # the copy the metadata names is still there
    assert len(list(tmp_path.glob("e.tokens-*.npy"))) == 1
    np.testing.assert_array_equal(read_embeddings(path).token_array(), np.stack(tokens2[::-1]))
    assert calls == [1]
    # a missing or damaged copy: the column is read
    for copy in tmp_path.glob("e.tokens-*.npy"):
        copy.write_bytes(b"not an array")
    write_embeddings(tmp_path / "f.parquet", list("abcd"), emb, tokens=tokens)
    for copy in tmp_path.glob("f.tokens-*.npy"):
        copy.unlink()
    np.testing.assert_array_equal(read_embeddings(tmp_path / "f.parquet").token_array(), np.stack(tokens))
    assert calls == [1, 1]
    # unequal token counts: no copy
    write_embeddings(tmp_path / "g.parquet", ["a", "b"], emb[:2], tokens=[tokens[0], tokens[1][:2]])
    assert list(tmp_path.glob("g.tokens-*.npy")) == []


def test_equal_token_counts_read_as_one_array_and_bad_tokens_are_named(tmp_path):
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(5, 3)).astype(np.float32)
    tokens = [rng.normal(size=(4, 3)).astype(np.float32) for _ in range(5)]
    table = read_embeddings(write_embeddings(tmp_path / "e.parquet", list("abcde"), emb, tokens=tokens))
    block = table.token_array()
    assert block.shape == (5, 4, 3) and block.dtype == np.float32
    np.testing.assert_array_equal(block, np.stack(tokens))
    assert all(np.shares_memory(t, block) for t in table.tokens)  # the per-study arrays are views, no copies
    aligned = table.align(["d", "a"])
    np.testing.assert_array_equal(aligned.token_array(), np.stack([tokens[3], tokens[0]]))
    assert [t.shape for t in aligned.tokens] == [(4, 3), (4, 3)]
    ragged = read_embeddings(write_embeddings(tmp_path / "r.parquet", ["a", "b"], emb[:2], tokens=[tokens[0], tokens[1][:2]]))
    assert ragged.token_array() is None and [t.shape for t in ragged.tokens] == [(4, 3), (2, 3)]
    assert read_embeddings(tmp_path / "e.parquet", tokens=False).token_array() is None
    tokens[2][1, 0] = np.inf
    tokens[4][3, 2] = np.nan
    write_embeddings(tmp_path / "bad.parquet", list("abcde"), emb, tokens=tokens)
    with pytest.raises(EmbeddingError, match=r"2 row\(s\) with empty or non-finite tokens, e.g. c, e"):
        read_embeddings(tmp_path / "bad.parquet")
