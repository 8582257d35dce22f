"""Search that means something: the shipped small CLIP finds the scene a caption describes.

These run the whole product path — decode, embed with open_clip, SQLite, FAISS, the tools — on
pictures drawn by the scene generator, so "found the red circle" is a real claim about the index.
"""

from __future__ import annotations

import pytest

from store.library import IncomingImage, Library
from store.tinyclip.scenes import SUBJECTS
from tests.conftest import scene_jpeg
from tests.test_library import discord_source
from tools.search import Scope, find_similar, search_images


@pytest.fixture
async def gallery(library: Library) -> dict[tuple[str, str], int]:
    """One scene per colour+shape (48), alternating between channels 1 and 2."""
    items = [
        IncomingImage(discord_source(i + 1, channel=1 + i % 2), scene_jpeg(c, s, seed=1000 + i, degrade=True))
        for i, (c, s) in enumerate(SUBJECTS)
    ]
    outcomes = await library.index(items)
    assert all(o.status == "indexed" for o in outcomes)
    return {combo: o.image_id or 0 for combo, o in zip(SUBJECTS, outcomes)}


@pytest.mark.parametrize("colour,shape", [("red", "circle"), ("blue", "star"), ("yellow", "heart"), ("green", "square"), ("purple", "triangle"), ("white", "cross")])
async def test_text_search_finds_the_described_scene(library: Library, gallery: dict, colour: str, shape: str) -> None:
    results = await search_images(library, f"a {colour} {shape}", k=3)
    assert results[0]["id"] == gallery[(colour, shape)], results


async def test_look_alike_of_a_new_drawing_finds_its_twin(library: Library, gallery: dict) -> None:
    for colour, shape in [("orange", "star"), ("black", "circle"), ("green", "heart")]:
        results = await find_similar(library, scene_jpeg(colour, shape, seed=99, degrade=True), k=5)
        assert gallery[(colour, shape)] in [r["id"] for r in results[:5]]


async def test_scope_hides_the_best_match_in_an_unreadable_channel(library: Library, gallery: dict) -> None:
    target = gallery[("red", "circle")]  # index 0 → channel 1
    assert (await search_images(library, "a red circle", k=1))[0]["id"] == target
    only_2 = await search_images(library, "a red circle", k=5, scope=Scope.channels({2}))
    assert len(only_2) == 5
    assert target not in [r["id"] for r in only_2]
    assert all(r["source"]["channel_id"] == "2" for r in only_2)
