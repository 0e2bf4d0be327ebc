"""ProfileStore and CatalogStore: saved profiles with the position they
include, and catalog updates kept across restarts."""

from __future__ import annotations

import msgspec
import pytest

from sendtime.server.domain.catalog import Product
from sendtime.server.domain.profile import Profile
from tests.contract.conftest import Backend, track


async def test_profiles_are_saved_with_the_position_they_include(backend: Backend) -> None:
    profiles = backend.storage.profiles
    if profiles.writes_profiles_with_events:
        pytest.skip("this backend writes profiles with their events (see the test below)")
    assert await profiles.profiles_position() == 0
    assert await profiles.load_profiles(["u:ada"]) == {}
    ada = Profile(user_id="ada", event_count=3)
    encode = msgspec.msgpack.Encoder().encode
    await profiles.save_profiles([("u:ada", encode(ada)), ("u:bob", encode(Profile()))], 7)
    assert await profiles.profiles_position() == 7
    loaded = await profiles.load_profiles(["u:ada", "u:nobody"])
    assert list(loaded) == ["u:ada"]
    assert loaded["u:ada"] == ada
    ada.event_count = 4
    await profiles.save_profiles([("u:ada", encode(ada))], 9)
    assert (await profiles.load_profiles(["u:ada"]))["u:ada"].event_count == 4
    assert await profiles.profiles_position() == 9
    # staged rows are saved by the next save, before its own rows
    await profiles.stage_profiles([("u:ada", encode(Profile(event_count=5))), ("u:cy", encode(Profile()))])
    assert (await profiles.load_profiles(["u:ada"]))["u:ada"].event_count == 4
    await profiles.save_profiles([("u:cy", encode(Profile(event_count=1)))], 11)
    loaded = await profiles.load_profiles(["u:ada", "u:cy"])
    assert {key: p.event_count for key, p in loaded.items()} == {"u:ada": 5, "u:cy": 1}


async def test_a_backend_that_folds_with_the_events_stores_every_commit(backend: Backend) -> None:
    profiles = backend.storage.profiles
    if not profiles.writes_profiles_with_events:
        pytest.skip("the profile book folds and saves this backend's profiles (see the test above)")
    events = backend.events()
    await events.append([track("m1", "Product Viewed"), track("m2", "Product Viewed", user="bob")])
    await events.append([track("m3", "Product Viewed")])
    stored = await profiles.load_profiles(["u:ada", "u:bob", "u:nobody"])
    assert {key: p.event_count for key, p in stored.items()} == {"u:ada": 2, "u:bob": 1}
    # the listener is handed the profiles as committed: nothing to fold again
    last = backend.listener.rounds[-1].profiles
    assert last is not None
    assert last["u:ada"] == stored["u:ada"]
    with pytest.raises(RuntimeError):
        await profiles.save_profiles([("u:ada", msgspec.msgpack.encode(Profile()))], 1)
    with pytest.raises(RuntimeError):
        await profiles.stage_profiles([("u:ada", msgspec.msgpack.encode(Profile()))])


async def test_replay_returns_the_events_past_a_position(backend: Backend) -> None:
    events = backend.events()
    await events.append([track("m1", "Product Viewed")])
    _, first = await backend.storage.profiles.replay(0)
    await events.append([track("m2", "Product Viewed"), track("m3", "Product Viewed")])
    replayed, last = await backend.storage.profiles.replay(first)
    assert [e.message_id for e in replayed] == ["m2", "m3"]
    assert replayed[0] == track("m2", "Product Viewed")
    assert await backend.storage.profiles.replay(last) == ([], last)


async def test_catalog_updates_are_kept(backend: Backend) -> None:
    catalog = backend.storage.catalog
    assert await catalog.load_products() == []
    shoe = Product(id="p1", name="Shoe", price=10.0, currency="EUR")
    await catalog.save_products([shoe, Product(id="p2", name="Sock", price=2.0, currency="EUR")])
    await catalog.save_products([Product(id="p1", name="Shoe", price=12.0, currency="EUR")])
    by_id = {p.id: p for p in await catalog.load_products()}
    assert (len(by_id), by_id["p1"].price, by_id["p2"].name) == (2, 12.0, "Sock")
