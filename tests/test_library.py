"""The library's contract: index, dedupe, scope, forget, catch-up and repair, on real files."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
import pytest
import torch

import store.db

from store import vectors as vectors_module
from store.db import DatabaseUnavailable, SourceFilter, SourceRecord
from store.embedder import ClipEmbedder
from store.library import DB_FILE, IncomingImage, Library, ModelMismatch, ReindexIncomplete, file_source
from store.settings import Settings
from store.thumbs import ThumbStore
from store.vectors import HEADER_FILE, INDEX_FILE
from tests.conftest import NOT_A_DATABASE, LargestTensor, jpeg_bytes, sqlite_threads, sqlite_threads_left
from tools.search import Filters, Scope, ToolError, find_similar, get_description, search_images


def discord_source(
    attachment: int,
    channel: int,
    *,
    guild: int = 1,
    author: str = "ana",
    author_id: int = 100,
    text: str = "",
    posted_at: str = "2024-06-01T12:00:00+00:00",
    channel_name: str | None = None,
) -> SourceRecord:
    return SourceRecord(
        kind="discord",
        filename=f"photo{attachment}.jpg",
        posted_at=posted_at,
        guild_id=guild,
        channel_id=channel,
        message_id=attachment * 10,
        attachment_id=attachment,
        author_id=author_id,
        author_name=author,
        channel_name=channel_name or f"chan{channel}",
        posted_text=text,
    )


async def test_index_search_similar_describe_forget_verify(library: Library, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40), (120, 40, 160)]
    for i, colour in enumerate(colours):
        (folder / f"p{i}.jpg").write_bytes(jpeg_bytes(colour))
    outcomes = await library.index_paths([folder])
    assert [o.status for o in outcomes] == ["indexed"] * 5
    ids = [o.image_id for o in outcomes]
    assert (await library.stats())["images"] == 5

    results = await search_images(library, "a photo", k=3)
    assert len(results) == 3
    assert all(-1.0 <= r["score"] <= 1.0 for r in results)
    assert {r["id"] for r in results} <= set(ids)
    assert all(r["path"].startswith(str(folder.resolve())) for r in results)

    similar = await find_similar(library, folder / "p0.jpg", k=1)
    assert similar[0]["id"] == ids[0] and similar[0]["score"] > 0.99
    by_id = await find_similar(library, ids[0], k=4)
    assert ids[0] not in [r["id"] for r in by_id] and len(by_id) == 4

    info = await get_description(library, ids[2])
    assert info["id"] == ids[2] and info["width"] == 96 and Path(info["stored_copy"]).is_file()

    assert await library.forget_image(ids[2])
    assert ids[2] not in [r["id"] for r in await search_images(library, "a photo", k=5)]
    with pytest.raises(ToolError):
        await get_description(library, ids[2])
    assert not Path(info["stored_copy"]).exists()
    report = await library.verify()
    assert report.ok and not report.repaired


async def test_identical_bytes_are_stored_once_and_forgotten_per_source(library: Library) -> None:
    data = jpeg_bytes((10, 120, 200))
    first = await library.index([IncomingImage(discord_source(1, channel=11), data)])
    second = await library.index([IncomingImage(discord_source(2, channel=12), data)])
    again = await library.index([IncomingImage(discord_source(1, channel=11), data)])
    assert [o.status for o in first + second + again] == ["indexed", "duplicate", "unchanged"]
    assert first[0].image_id == second[0].image_id
    counts = await library.catalog.counts()
    assert counts["images"] == 1 and counts["sources"] == 2

    # Forgetting one post keeps the image findable through the other, and only there.
    await library.forget_messages([10])
    in_11 = await find_similar(library, data, k=5, scope=Scope.channels({11}))
    in_12 = await find_similar(library, data, k=5, scope=Scope.channels({12}))
    assert in_11 == [] and [r["id"] for r in in_12] == [first[0].image_id]
    await library.forget_messages([20])
    assert (await library.catalog.counts())["images"] == 0
    assert library.vectors.count == 0


async def test_words_posted_where_the_asker_cannot_read_neither_find_nor_rank_a_photo(library: Library) -> None:
    """The same bytes posted in #general (no words) and in #staff (with words) are one image.
    Someone who reads only #general must not be able to probe the #staff words: they must not
    match the photo, nor lift it above the others, nor be returned with it."""
    photos = [jpeg_bytes((30 * i, 200 - 30 * i, 90), mark=i + 1) for i in range(6)]
    outcomes = await library.index([IncomingImage(discord_source(1 + i, channel=11), p) for i, p in enumerate(photos)])
    ids = [o.image_id for o in outcomes]
    general = Scope.channels({11}, {1})
    before = await search_images(library, "zanzibar", k=6, scope=general)
    last = before[-1]["id"]  # a photo the words do not favour
    target = ids.index(last)
    [dup] = await library.index([IncomingImage(discord_source(50, channel=12, text="zanzibar acquisition"), photos[target])])
    assert dup.status == "duplicate" and dup.image_id == last

    flt = Filters().source_filter(general)
    assert await library.catalog.text_matches("zanzibar", 10, flt) == []
    after = await search_images(library, "zanzibar", k=6, scope=general)
    assert [r["id"] for r in after] == [r["id"] for r in before]
    assert all("zanzibar" not in (r.get("posted_text") or "") for r in after)
    # Whoever reads #staff finds it by those words.
    staff = Filters().source_filter(Scope.channels({12}, {1}))
    assert await library.catalog.text_matches("zanzibar", 10, staff) == [last]


async def test_text_matches_rank_the_newest_matches_in_scope(library: Library, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ranking costs per matching row, so only the newest few matches are ranked; in a scope,
    the newest few *in* it, however many newer ones lie outside."""
    monkeypatch.setattr(store.db, "RANKED_TEXT_MATCHES", 2)
    items = [IncomingImage(discord_source(1 + i, channel=11 if i < 3 else 12, text="zanzibar harbour"),
                           jpeg_bytes((40 * i, 90, 200 - 30 * i), mark=i + 1)) for i in range(6)]
    ids = [o.image_id for o in await library.index(items)]
    everything = Filters().source_filter(Scope.everything())
    assert set(await library.catalog.text_matches("zanzibar", 10, everything)) == {ids[4], ids[5]}
    eleven = Filters().source_filter(Scope.channels({11}, {1}))
    assert set(await library.catalog.text_matches("zanzibar", 10, eleven)) == {ids[1], ids[2]}
    await library.set_description(ids[0], "a zanzibar dhow at dusk", "test")
    assert ids[0] in await library.catalog.text_matches("zanzibar", 10, eleven)


async def test_scope_returns_k_in_scope_results_even_when_others_rank_higher(library: Library) -> None:
    # 40 near-copies of the query live in channel 2; the only 6 images in channel 1 look different.
    query = jpeg_bytes((250, 250, 250))
    items = [IncomingImage(discord_source(100 + i, channel=2), jpeg_bytes((250, 250, 250), mark=i + 1)) for i in range(40)]
    items += [IncomingImage(discord_source(200 + i, channel=1), jpeg_bytes((20 * i, 90, 180 - 20 * i))) for i in range(6)]
    outcomes = await library.index(items)
    assert all(o.status == "indexed" for o in outcomes)
    in_channel_1 = {o.image_id for o in outcomes[40:]}

    results = await find_similar(library, query, k=5, scope=Scope.channels({1}))
    assert len(results) == 5
    assert {r["id"] for r in results} <= in_channel_1
    assert all(r["source"]["channel_id"] == "1" for r in results)
    everything = await find_similar(library, query, k=5)
    assert not {r["id"] for r in everything} & in_channel_1  # the scope really changed the answer
    assert await find_similar(library, query, k=5, scope=Scope.channels(set())) == []
    with pytest.raises(ToolError):  # an image outside the scope looks exactly like a missing one
        await get_description(library, outcomes[0].image_id or 0, scope=Scope.channels({1}))


async def _ten_channels(library: Library, count: int = 300) -> dict[int, int]:
    """`count` distinct photos spread over channels 0-9 of one server: image id -> channel."""
    rng = np.random.default_rng(5)
    colours = [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(count)]
    items = [IncomingImage(discord_source(1000 + i, channel=i % 10), jpeg_bytes(colours[i], mark=i % 7)) for i in range(count)]
    outcomes = await library.index(items)
    assert all(o.status == "indexed" for o in outcomes)
    return {o.image_id or 0: i % 10 for i, o in enumerate(outcomes)}


def _exact_top(library: Library, query: np.ndarray, ids: list[int], k: int) -> list[int]:
    vectors = {i: library.vectors.vector(i) for i in ids}
    return sorted(ids, key=lambda i: -float(np.dot(vectors[i], query)))[:k]


async def test_wide_and_narrow_scopes_give_the_exact_visible_top_k(
    library: Library, monkeypatch: pytest.MonkeyPatch
) -> None:
    channel_of = await _ten_channels(library)
    listed: list[SourceFilter] = []
    list_all = library.catalog.visible_image_ids

    async def counting(flt: SourceFilter) -> np.ndarray:
        listed.append(flt)
        return await list_all(flt)

    monkeypatch.setattr(library.catalog, "visible_image_ids", counting)
    query = library.vectors.vector(next(iter(channel_of)))
    assert query is not None
    # Nine channels of ten: the best candidates are checked, nothing is listed.
    wide = Filters().source_filter(Scope.channels(set(range(9)), {1}))
    visible = [i for i, c in channel_of.items() if c != 9]
    hits = await library.search_vector(query, 10, wide)
    assert [i for i, _ in hits] == _exact_top(library, query, visible, 10)
    assert listed == []
    # One channel of ten: too few would pass among the candidates, so its images are listed.
    narrow = Filters().source_filter(Scope.channels({4}, {1}))
    hits = await library.search_vector(query, 10, narrow)
    assert [i for i, _ in hits] == _exact_top(library, query, [i for i, c in channel_of.items() if c == 4], 10)
    assert listed == [narrow]
    # An excluded image (find_similar's own) is neither returned nor counted.
    own = [i for i, c in channel_of.items() if c == 0][0]
    own_vector = library.vectors.vector(own)
    assert own_vector is not None
    hits = await library.search_vector(own_vector, 5, wide, exclude=[own])
    assert own not in {i for i, _ in hits} and len(hits) == 5


async def test_a_wide_scope_whose_probed_lists_run_out_probes_further(
    library: Library, monkeypatch: pytest.MonkeyPatch
) -> None:
    channel_of = await _ten_channels(library)
    monkeypatch.setattr(vectors_module, "APPROXIMATE_FROM", 200)
    await library.save_vectors()
    assert library.vectors.layout == "ivf"
    library.vectors.nprobe = 1  # one list of ~19 vectors: fewer candidates than asked for
    wide = Filters().source_filter(Scope.channels(set(range(9)), {1}))
    query = library.vectors.vector(next(iter(channel_of)))
    assert query is not None
    hits = await library.search_vector(query, 40, wide)
    assert len(hits) == 40 and all(channel_of[i] != 9 for i, _ in hits)


async def test_filters_author_channel_dates_and_sort(library: Library) -> None:
    items = [
        IncomingImage(discord_source(1, 5, author="Ana", posted_at="2023-07-10T10:00:00+00:00", channel_name="summer"), jpeg_bytes((200, 0, 0))),
        IncomingImage(discord_source(2, 5, author="Ben", author_id=200, posted_at="2023-08-10T10:00:00+00:00", channel_name="summer"), jpeg_bytes((0, 200, 0))),
        IncomingImage(discord_source(3, 6, author="Ana", posted_at="2024-01-05T10:00:00+00:00", channel_name="winter"), jpeg_bytes((0, 0, 200))),
    ]
    ids = [o.image_id for o in await library.index(items)]
    by_ana = await search_images(library, "a photo", k=5, filters=Filters(author="ana"))
    assert sorted(r["id"] for r in by_ana) == sorted([ids[0], ids[2]])
    in_winter = await search_images(library, "a photo", k=5, filters=Filters(channel="#winter"))
    assert [r["id"] for r in in_winter] == [ids[2]]
    summer_2023 = await search_images(library, "a photo", k=5, filters=Filters(after="2023-07-01", before="2023-07-31"))
    assert [r["id"] for r in summer_2023] == [ids[0]]
    newest = await search_images(library, "a photo", k=5, filters=Filters(sort="newest"))
    assert [r["id"] for r in newest] == [ids[2], ids[1], ids[0]]
    with pytest.raises(ToolError):
        await search_images(library, "a photo", filters=Filters(after="last summer"))
    with pytest.raises(ToolError):
        await search_images(library, "a photo", k=0)
    with pytest.raises(ToolError):
        await search_images(library, "   ")


async def test_posted_text_and_descriptions_are_searchable(library: Library) -> None:
    items = [IncomingImage(discord_source(i, 1), jpeg_bytes((30 * i, 100, 100))) for i in range(1, 8)]
    items.append(IncomingImage(discord_source(50, 1, text="Grandpa Joe at his 90th birthday"), jpeg_bytes((5, 5, 5))))
    outcomes = await library.index(items)
    grandpa = outcomes[-1].image_id
    top = await search_images(library, "grandpa", k=1)
    assert top[0]["id"] == grandpa and "Grandpa" in top[0]["posted_text"]
    await library.set_description(outcomes[0].image_id or 0, "a whiteboard covered in sticky notes", "import")
    top = await search_images(library, "whiteboard from the offsite", k=1)
    assert top[0]["id"] == outcomes[0].image_id


async def test_vector_index_is_rebuilt_or_caught_up_on_open(settings, embedder, library: Library) -> None:
    outcomes = await library.index([IncomingImage(discord_source(i, 1), jpeg_bytes((20 * i, 50, 50))) for i in range(1, 6)])
    await library.close()
    data_dir = settings.data_dir

    (data_dir / INDEX_FILE).unlink()  # lost index file
    reopened = await Library.open(settings, embedder)
    assert reopened.vectors.count == 5
    # An index saved before the last writes (a crash between commit and save) is caught up.
    stale_header = json.loads((data_dir / HEADER_FILE).read_text())
    await reopened.index([IncomingImage(discord_source(9, 1), jpeg_bytes((1, 2, 3)))])
    await reopened.forget_messages([10])
    reopened.vectors.generation = stale_header["generation"]
    reopened.vectors.remove(np.array([o.image_id for o in outcomes[1:3]], dtype=np.int64))
    reopened.vectors.save(data_dir)
    await reopened.catalog.close()
    again = await Library.open(settings, embedder)
    try:
        assert sorted(again.vectors.ids().tolist()) == sorted((await again.catalog.all_image_ids()).tolist())
        assert again.vectors.count == 5
        assert (await again.verify(repair=False)).ok
    finally:
        await again.close()


async def test_indexing_the_originals_again_writes_lost_stored_copies(library: Library, tmp_path: Path) -> None:
    folder = tmp_path / "pics"
    folder.mkdir()
    for i in range(3):
        (folder / f"p{i}.jpg").write_bytes(jpeg_bytes((60 * i, 90, 30), mark=i + 1))
    first = await library.index_paths([folder])
    record = await library.catalog.get_image(first[1].image_id or 0)
    assert record is not None
    lost = library.thumb_path(record)
    kept = lost.read_bytes()
    lost.unlink()
    assert any("missing" in p for p in (await library.verify(repair=True)).problems)  # found, not fixable
    again = await library.index_paths([folder])
    assert [o.status for o in again] == ["unchanged"] * 3
    assert lost.read_bytes() == kept  # the same copy as before, from the same bytes
    assert (await library.verify(repair=False)).ok


async def test_a_copy_written_again_for_a_photo_forgotten_meanwhile_goes_again(library: Library, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same photo is posted again while its stored copy is missing, and its first post is
    deleted while the repost is being read: the photo leaves the catalog, and its copy with it."""
    data = jpeg_bytes((10, 120, 200))
    [first] = await library.index([IncomingImage(discord_source(1, channel=11), data)])
    record = await library.catalog.get_image(first.image_id or 0)
    assert record is not None
    copy = library.thumb_path(record)
    copy.unlink()  # lost: the repost will write it again
    catalog = library.catalog
    look_up = catalog.stored_copies

    async def then_deleted(shas: list[str]) -> dict[str, str]:
        found = await look_up(shas)
        await library.forget_messages([10])  # the first post is deleted meanwhile
        return found

    monkeypatch.setattr(catalog, "stored_copies", then_deleted)
    await library.index([IncomingImage(discord_source(2, channel=12), data)])
    assert (await catalog.counts())["images"] == 0
    assert not copy.exists(), "the forgotten photo's stored copy was written back"


async def test_verify_repairs_a_tampered_index_and_stray_files(library: Library, settings) -> None:
    outcomes = await library.index([IncomingImage(discord_source(i, 1), jpeg_bytes((40 * i, 10, 10))) for i in range(1, 4)])
    library.vectors.remove(np.array([outcomes[0].image_id], dtype=np.int64))
    stray = settings.data_dir / "thumbs" / "ab" / "stray.jpg.123.tmp"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"half a file")
    async with library.catalog.transaction() as conn:  # words indexed for a source that is not there
        await conn.execute("INSERT INTO sources_fts (rowid, posted_text) VALUES (999, 'ghost words')")
    check = await library.verify(repair=False)
    assert not check.ok and any("out of step" in p for p in check.problems)
    assert any("posted-text" in p for p in check.problems)
    repaired = await library.verify(repair=True)
    assert repaired.ok and len(repaired.repaired) == 3 and not stray.exists()
    assert library.vectors.count == 3
    assert (await library.verify(repair=False)).ok


async def test_rejected_files_are_recorded_and_leave_nothing_behind(library: Library, tmp_path: Path, settings) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "good.jpg").write_bytes(jpeg_bytes((1, 200, 3)))
    (folder / "page.jpg").write_text("<!doctype html><html><body>not a photo</body></html>")
    (folder / "empty.png").write_bytes(b"")
    (folder / "cut.jpg").write_bytes(jpeg_bytes((9, 9, 200), size=(400, 300))[:300])
    (folder / "huge.png").write_bytes(b"\x89PNG" + b"\0" * (6 * 1024 * 1024))
    outcomes = {Path(o.source.path or "").name: o for o in await library.index_paths([folder])}
    assert outcomes["good.jpg"].status == "indexed"
    for name in ("page.jpg", "empty.png", "cut.jpg", "huge.png"):
        assert outcomes[name].status == "failed" and outcomes[name].reason, name
    assert "limit" in (outcomes["huge.png"].reason or "")
    assert len(library.thumbs.all_relative()) == 1
    failures = await library.catalog.recent_failures(10)
    assert len(failures) == 4


async def test_a_picture_one_pixel_wide_is_indexed_without_a_huge_resize(
    library: Library, embedder: ClipEmbedder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1 x 200,000 pixels is a 500-byte PNG; resized whole for the small model's 64-px crop it
    would be 64 x 12,800,000 (3.3 GB). Only the crop's window is resized, in a few MB."""
    from PIL import Image

    strip = tmp_path / "strip.png"
    Image.new("RGB", (1, 200_000), (200, 30, 30)).save(strip)
    preprocess = embedder.preprocess_pixels
    largest: list[int] = []

    def measured(pixels: object) -> object:
        with LargestTensor() as seen:
            prepared = preprocess(pixels)
        largest.append(seen.nbytes)
        return prepared

    monkeypatch.setattr(embedder, "preprocess_pixels", measured)
    [outcome] = await library.index_paths([strip])
    assert outcome.status == "indexed" and outcome.image_id is not None
    assert len(largest) == 1 and largest[0] <= 4 * 1024 * 1024
    assert len(library.thumbs.all_relative()) == 1


async def test_a_picture_the_models_preprocessing_fails_on_is_refused_alone(
    library: Library, embedder: ClipEmbedder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Torch failing to allocate while preparing one picture refuses that picture with a reason;
    the others in its batch are indexed."""
    folder = tmp_path / "batch"
    folder.mkdir()
    (folder / "fine.jpg").write_bytes(jpeg_bytes((200, 30, 30)))
    (folder / "doomed.jpg").write_bytes(jpeg_bytes((30, 30, 200), size=(97, 61)))
    (folder / "also_fine.jpg").write_bytes(jpeg_bytes((30, 200, 30)))
    preprocess = embedder.preprocess_pixels

    def fails_on_one(pixels: torch.Tensor) -> object:
        if tuple(pixels.shape[-2:]) == (61, 97):
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return preprocess(pixels)

    monkeypatch.setattr(embedder, "preprocess_pixels", fails_on_one)
    outcomes = {Path(o.source.path or "").name: o for o in await library.index_paths([folder])}
    assert {name: o.status for name, o in outcomes.items()} == {
        "fine.jpg": "indexed", "doomed.jpg": "failed", "also_fine.jpg": "indexed",
    }
    assert outcomes["doomed.jpg"].reason == "image could not be prepared for searching"
    assert len(library.thumbs.all_relative()) == 2 and (await library.verify(repair=False)).ok


async def test_another_model_is_refused_until_reindexed(settings, embedder, library: Library, tmp_path: Path) -> None:
    import open_clip
    import torch

    outcomes = await library.index([IncomingImage(discord_source(i, 1), jpeg_bytes((50 * i, 0, 0))) for i in range(1, 4)])
    await library.close()
    model, _, _ = open_clip.create_model_and_transforms("shoebox-tiny", pretrained=None)
    other_weights = tmp_path / "other.pt"
    torch.save(model.state_dict(), other_weights)
    from dataclasses import replace

    from store.embedder import load_embedder

    other = load_embedder(replace(settings.clip, checkpoint=other_weights))
    assert other.model_id != embedder.model_id
    with pytest.raises(ModelMismatch, match="reindex"):
        await Library.open(settings, other)
    lib = await Library.open(settings, other, allow_other_model=True)
    try:
        # A stored copy that cannot be read stops the switch: no image gets the new model's vector.
        record = await lib.catalog.get_image(outcomes[1].image_id or 0)
        assert record is not None
        copy = lib.thumb_path(record)
        saved = copy.read_bytes()
        copy.unlink()
        with pytest.raises(ReindexIncomplete, match="could not be re-embedded") as stopped:
            await lib.reindex(other)
        assert stopped.value.image_ids == [record.id] and stopped.value.done == 2
        assert await lib.catalog.get_meta("model_id") == embedder.model_id
        assert await lib.catalog.models_in_use() == {embedder.model_id: 3}
        copy.write_bytes(saved)
        embedded: list[int] = []
        original = other.embed_images
        other.embed_images = lambda images: embedded.append(len(images)) or original(images)  # type: ignore[method-assign]
        assert await lib.reindex(other) == 3
        assert embedded == [1]  # the two staged before are kept
        assert await lib.catalog.get_meta("model_id") == other.model_id
        assert (await lib.verify(repair=False)).ok
    finally:
        await lib.close()
    reopened = await Library.open(settings, other)
    assert reopened.vectors.count == 3
    await reopened.close()


async def test_changed_file_replaces_its_old_image_and_repeats_count_once(library: Library, tmp_path: Path) -> None:
    folder = tmp_path / "pics"
    folder.mkdir()
    photo = folder / "photo.jpg"
    photo.write_bytes(jpeg_bytes((200, 10, 10)))
    first = await library.index_paths([photo, photo, folder])
    assert [o.status for o in first] == ["indexed"]
    photo.write_bytes(jpeg_bytes((10, 10, 200)))
    second = await library.index_paths([photo])
    assert second[0].status == "indexed" and second[0].image_id != first[0].image_id
    assert (await library.catalog.all_image_ids()).tolist() == [second[0].image_id]
    assert library.vectors.ids().tolist() == [second[0].image_id]
    assert (await library.verify(repair=False)).ok


async def test_a_batch_of_new_images_is_stored_together_and_one_with_a_known_image_one_by_one(
    library: Library, monkeypatch: pytest.MonkeyPatch
) -> None:
    """New images are inserted a batch at a time; a batch holding an image or source that is
    already stored falls back to one by one, and both ways store the same rows."""
    calls: list[tuple[int, str]] = []
    insert_new_images = library.catalog.insert_new_images

    async def spying(conn: object, news: list[object]) -> list[int]:
        try:
            ids = await insert_new_images(conn, news)  # type: ignore[arg-type]
        except Exception as error:
            calls.append((len(news), type(error).__name__))
            raise
        calls.append((len(news), "stored"))
        return ids

    monkeypatch.setattr(library.catalog, "insert_new_images", spying)
    texts = ["sunset over the harbour", "", "a snowman with a carrot nose"]
    first = await library.index(
        [IncomingImage(discord_source(n, 3, text=text), jpeg_bytes((70 * n, 20, 90))) for n, text in enumerate(texts)]
    )
    assert calls == [(3, "stored")]
    assert [o.status for o in first] == ["indexed"] * 3
    ids = [o.image_id for o in first]
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert (await search_images(library, "snowman", k=1))[0]["id"] == ids[2]
    assert (await search_images(library, "harbour", k=1))[0]["id"] == ids[0]
    for outcome in first:
        assert (await library.catalog.find_sources("image_id", outcome.image_id or 0))[0].key == outcome.source.key

    # Attachment 1 again, now with other bytes: its source is already stored, so the batch
    # goes one by one, which replaces that image and stores the new one beside it.
    second = await library.index(
        [
            IncomingImage(discord_source(1, 3), jpeg_bytes((250, 250, 0))),
            IncomingImage(discord_source(9, 3, text="a red kite"), jpeg_bytes((0, 250, 250))),
        ]
    )
    assert calls == [(3, "stored"), (2, "IntegrityError")]
    assert [o.status for o in second] == ["indexed", "indexed"]
    assert sorted((await library.catalog.all_image_ids()).tolist()) == sorted([ids[0], ids[2], *(o.image_id for o in second)])
    assert (await search_images(library, "kite", k=1))[0]["id"] == second[1].image_id
    assert (await library.verify(repair=False)).ok


async def test_a_copy_that_cannot_be_written_fails_its_image_alone(
    library: Library, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk while writing one stored copy: that image is refused with the reason, the
    rest of its batch lands, nothing half-written stays, and indexing it again works."""
    folder = tmp_path / "batch"
    folder.mkdir()
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    for number, colour in enumerate(colours):
        (folder / f"p{number}.jpg").write_bytes(jpeg_bytes(colour, size=(900, 600)))
    doomed = hashlib.sha256((folder / "p2.jpg").read_bytes()).hexdigest()
    write_with = ThumbStore.write_with

    def half_then_disk_full(handle: BinaryIO) -> None:
        handle.write(b"half a picture")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def full_disk_for_one(self: ThumbStore, sha256: str, extension: str, fill: Callable[[BinaryIO], object]) -> str:
        return write_with(self, sha256, extension, half_then_disk_full if sha256 == doomed else fill)

    monkeypatch.setattr(ThumbStore, "write_with", full_disk_for_one)
    outcomes = {Path(o.source.path or "").name: o for o in await library.index_paths([folder])}
    assert {name: o.status for name, o in outcomes.items()} == {
        "p0.jpg": "indexed", "p1.jpg": "indexed", "p2.jpg": "failed", "p3.jpg": "indexed",
    }
    assert "could not be stored" in (outcomes["p2.jpg"].reason or "") and "No space" in (outcomes["p2.jpg"].reason or "")
    assert len(library.thumbs.all_relative()) == 3 and len(await library.catalog.all_image_ids()) == 3
    assert (await library.verify(repair=False)).ok

    monkeypatch.setattr(ThumbStore, "write_with", write_with)
    again = {Path(o.source.path or "").name: o.status for o in await library.index_paths([folder])}
    assert again == {"p0.jpg": "unchanged", "p1.jpg": "unchanged", "p2.jpg": "indexed", "p3.jpg": "unchanged"}
    assert len(library.thumbs.all_relative()) == 4 and (await library.verify(repair=False)).ok


async def test_a_batch_is_settled_in_a_few_queries(library: Library, tmp_path: Path) -> None:
    """Re-running over known files, renamed copies and new files: each gets the right outcome
    from the batched lookups (same source and bytes: unchanged; known bytes: a new source)."""
    folder = tmp_path / "mix"
    folder.mkdir()
    for number in range(5):
        (folder / f"known{number}.jpg").write_bytes(jpeg_bytes((40 * number, 90, 160)))
    first = await library.index_paths([folder])
    assert [o.status for o in first] == ["indexed"] * 5
    (folder / "again0.jpg").write_bytes((folder / "known0.jpg").read_bytes())
    (folder / "new.jpg").write_bytes(jpeg_bytes((250, 250, 250)))
    discord = discord_source(77, 7)
    outcomes = await library.index(
        [IncomingImage(source=discord, data=(folder / "known3.jpg").read_bytes())]
        + [IncomingImage(source=file_source(path)) for path in sorted(folder.iterdir())]
    )
    statuses = {o.source.key: o.status for o in outcomes}
    assert statuses[discord.key] == "duplicate"
    assert statuses[f"file:{folder / 'again0.jpg'}"] == "duplicate"
    assert statuses[f"file:{folder / 'new.jpg'}"] == "indexed"
    assert [statuses[f"file:{folder / f'known{n}.jpg'}"] for n in range(5)] == ["unchanged"] * 5
    stored = await library.catalog.sources_with_sha([discord, *(file_source(p) for p in sorted(folder.iterdir()))])
    assert len(stored) == 8 and stored[discord.key][1] == stored[f"file:{folder / 'known3.jpg'}"][1]
    assert set(await library.catalog.stored_copies(["0" * 64, stored[discord.key][1]])) == {stored[discord.key][1]}


def test_jobs_are_cut_into_even_batches_a_multiple_of_the_lanes() -> None:
    from store.library import _even_batches

    def sizes(count: int, size: int, multiple_of: int = 2) -> list[int]:
        batches = _even_batches(list(range(count)), size, multiple_of)
        assert [n for batch in batches for n in batch] == list(range(count))  # all, in order
        return [len(batch) for batch in batches]

    assert sizes(0, 16) == []
    assert sizes(5, 16) == [5]
    assert sizes(16, 16) == [16]
    assert sizes(17, 16) == [9, 8]
    assert sizes(48, 16) == [12, 12, 12, 12]
    assert sizes(50, 16) == [13, 13, 12, 12]
    assert sizes(480, 16) == [16] * 30
    assert sizes(3, 1) == [1, 1, 1]  # never over the batch size, even to pair them up
    assert sizes(33, 16, multiple_of=1) == [11, 11, 11]


async def test_batches_share_the_model_in_lanes_and_commit_in_order(
    library: Library, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Up to MODEL_LANES batches are in the model at once, on the lane threads, and still commit
    one after another in input order; bytes met again in a batch decoded before the first one
    committed become a second source of the same image."""
    import threading
    import time

    from store.library import MODEL_LANES

    folder = tmp_path / "lanes"
    folder.mkdir()
    for number in range(20):
        (folder / f"p{number:02d}.jpg").write_bytes(jpeg_bytes((12 * number, 255 - 12 * number, 90)))
    (folder / "p09.jpg").write_bytes((folder / "p01.jpg").read_bytes())  # batch 2 repeats batch 0
    inside, most, threads, splits = 0, 0, set(), set()
    lock = threading.Lock()
    embed_in_lane = library.embedder.embed_preprocessed_in_lane  # type: ignore[attr-defined]

    def counting(inputs: list[object], lanes: int) -> np.ndarray:
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
            threads.add(threading.current_thread().name)
            splits.add(lanes)
        try:
            time.sleep(0.2)  # long enough for the next batch to catch up
            return embed_in_lane(inputs, lanes)
        finally:
            with lock:
                inside -= 1

    monkeypatch.setattr(library.embedder, "embed_preprocessed_in_lane", counting)
    seen: list[int] = []
    paths = sorted(folder.iterdir())
    outcomes = await library.index(
        [IncomingImage(file_source(path)) for path in paths], progress=lambda done, _: seen.append(done), batch_size=4
    )
    assert most == MODEL_LANES == 2
    assert splits == {MODEL_LANES}
    assert all(name.startswith("shoebox-lane") for name in threads), threads
    assert [o.source.path for o in outcomes] == [str(p) for p in paths]
    assert [o.status for o in outcomes] == ["indexed"] * 9 + ["duplicate"] + ["indexed"] * 10
    assert outcomes[9].image_id == outcomes[1].image_id
    new_ids = [o.image_id for o in outcomes if o.status == "indexed"]
    assert new_ids == sorted(new_ids)  # committed batch by batch, in order
    assert seen == [4, 8, 11, 14, 17, 20]  # five batches of 4 would leave the last alone: six
    assert (await library.verify(repair=False)).ok


async def test_batches_are_decoded_ahead_of_busy_lanes_but_no_further(
    library: Library, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While both lanes are in the model, BATCHES_AHEAD more batches get read and decoded, so
    lanes that finish together each find one ready; more than that would only hold memory."""
    import asyncio
    import threading

    from store.library import BATCHES_AHEAD, MODEL_LANES

    folder = tmp_path / "ahead"
    folder.mkdir()
    for number in range(24):
        (folder / f"p{number:02d}.jpg").write_bytes(jpeg_bytes((10 * number, 250 - 10 * number, 30)))
    release = threading.Event()
    prepared = 0
    prepare, embed_in_lane = library._prepare, library.embedder.embed_preprocessed_in_lane  # type: ignore[attr-defined]

    async def counting_prepare(batch: list[IncomingImage]) -> object:
        nonlocal prepared
        done = await prepare(batch)
        prepared += 1
        return done

    def held_lane(inputs: list[object], lanes: int) -> np.ndarray:
        assert release.wait(timeout=30), "the test never released the lanes"
        return embed_in_lane(inputs, lanes)

    monkeypatch.setattr(library, "_prepare", counting_prepare)
    monkeypatch.setattr(library.embedder, "embed_preprocessed_in_lane", held_lane)
    job = asyncio.ensure_future(
        library.index([IncomingImage(file_source(p)) for p in sorted(folder.iterdir())], batch_size=4)
    )
    try:
        for _ in range(300):
            if prepared >= MODEL_LANES + BATCHES_AHEAD:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # time for any further batch to be decoded, were it started
        assert prepared == MODEL_LANES + BATCHES_AHEAD == 4
    finally:
        release.set()
        outcomes = await job
    assert [o.status for o in outcomes] == ["indexed"] * 24
    assert prepared == 6


async def test_a_job_of_one_batch_runs_its_pass_on_the_torch_thread(
    library: Library, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chat post of a few photos (or a batch from the bot's queue) is one batch with nothing
    beside it in the model: its pass gets all the model's threads on the embedder's own torch
    thread, not a lane (a one-thread lane would leave a core idle; a lane with all the threads
    would leave a second OpenMP team behind)."""
    import threading

    embedder = library.embedder
    lane_calls: list[int] = []
    pass_threads: list[str] = []
    embed_in_lane, embed_batch = embedder.embed_preprocessed_in_lane, embedder._embed_batch  # type: ignore[attr-defined]

    def lane(inputs: list[object], lanes: int) -> np.ndarray:
        lane_calls.append(lanes)
        return embed_in_lane(inputs, lanes)

    def forward(batch: object) -> np.ndarray:
        pass_threads.append(threading.current_thread().name)
        return embed_batch(batch)

    monkeypatch.setattr(embedder, "embed_preprocessed_in_lane", lane)
    monkeypatch.setattr(embedder, "_embed_batch", forward)
    folder = tmp_path / "post"
    folder.mkdir()
    for number in range(3):
        (folder / f"p{number}.jpg").write_bytes(jpeg_bytes((80 * number, 40, 200 - 60 * number)))
    outcomes = await library.index([IncomingImage(file_source(path)) for path in sorted(folder.iterdir())])
    assert [o.status for o in outcomes] == ["indexed"] * 3
    assert lane_calls == []
    assert len(pass_threads) == 1 and pass_threads[0].startswith("shoebox-torch"), pass_threads
    assert (await library.verify(repair=False)).ok


async def test_a_library_that_fails_to_open_leaves_nothing_running(
    settings: Settings, embedder: ClipEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether the catalog itself is unusable or a later step of opening fails, the caller gets
    the error and no connection is left open (it would keep the process from exiting)."""
    before = sqlite_threads()
    settings.data_dir.mkdir(parents=True)
    catalog = settings.data_dir / DB_FILE
    catalog.write_bytes(NOT_A_DATABASE)
    with pytest.raises(DatabaseUnavailable, match="cannot be opened as a database") as refused:
        await Library.open(settings, embedder)
    # Checked while each error (and the frames it holds) is alive, as it is while it is reported.
    assert not sqlite_threads_left(before), refused.value

    catalog.unlink()

    async def failing_sweep(self: Library) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(Library, "sweep_stored_copies", failing_sweep)
    with pytest.raises(OSError, match="Input/output error") as failed:
        await Library.open(settings, embedder)
    assert not sqlite_threads_left(before), failed.value


async def test_a_files_imported_description_stays_with_the_file(library: Library, tmp_path: Path) -> None:
    """The operator's words about a local file are not the picture's: the same bytes posted on
    Discord are neither found by them nor shown with them, while the terminal finds the file."""
    data = jpeg_bytes((200, 40, 40))
    local = tmp_path / "IMG_0042.jpg"
    local.write_bytes(data)
    [on_disk] = await library.index_paths([local])
    await library.index([IncomingImage(discord_source(1, channel=11), data)])
    assert await library.set_file_text(local, "grandma at the oncology ward")
    assert not await library.set_file_text(tmp_path / "never-indexed.jpg", "x")

    channel = Scope.channels({11})
    assert [r for r in await search_images(library, "oncology", scope=channel) if "oncology" in json.dumps(r)] == []
    shown = await get_description(library, on_disk.image_id or 0, channel)
    assert "oncology" not in json.dumps(shown) and shown["posts"]
    [found, *_] = await search_images(library, "oncology ward", scope=Scope.everything())
    assert found["id"] == on_disk.image_id
    everything = await get_description(library, on_disk.image_id or 0, Scope.everything())
    assert {"path": str(local.resolve()), "text": "grandma at the oncology ward"} in [
        {"path": post.get("path"), "text": post["posted_text"]} for post in everything["posts"]]
    assert await library.catalog.text_matches("oncology", 5, SourceFilter(channel_ids=frozenset({11}), include_files=False)) == []
