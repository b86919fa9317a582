"""Live DVar values over a websocket (djstm.consumers.DVarConsumer), fed by commits in any process."""

import asyncio
from types import SimpleNamespace

from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import AnonymousUser
from django.test.utils import override_settings

import djstm
from djstm.consumers import DVarConsumer

from .conftest import ALIAS, bump_by_hand

STAFF = SimpleNamespace(is_active=True, is_staff=True)
LIVE = {"CHANNEL_LAYER": "djstm", "ADMIN_DATABASE": ALIAS, "POLL_INTERVAL": 0.5}


async def connected(user):
    communicator = WebsocketCommunicator(DVarConsumer.as_asgi(), "/ws/djstm/")
    communicator.scope["user"] = user
    ok, _ = await communicator.connect()
    assert ok
    return communicator


def run(coroutine, **djstm_settings):
    with override_settings(DJSTM={**LIVE, **djstm_settings}):
        return asyncio.run(asyncio.wait_for(coroutine, 30))


def test_a_page_gets_the_values_then_each_commit(open_store, store_name):
    store = open_store()
    price, banner = store.dvar("price", 12), store.dvar("banner", "<b>hi</b>")
    store.dvar("private", 1)

    async def main():
        page = await connected(STAFF)
        await page.send_json_to({"subscribe": [{"store": store_name, "name": "price"},
                                               {"store": store_name, "prefix": "ban"}]})
        first = {(await page.receive_json_from(5))["name"] for _ in range(2)}
        assert first == {"price", "banner"}
        await sync_to_async(djstm.atomically)(lambda: price.write(13))
        assert await page.receive_json_from(5) == {"store": store_name, "name": "price", "version": 1, "value": 13}
        await sync_to_async(djstm.atomically)(lambda: banner.write("<img src=x onerror=alert(1)>"))
        update = await page.receive_json_from(5)
        assert update["value"] == "<img src=x onerror=alert(1)>"  # data, for the page to show as text
        assert await page.receive_nothing(0.3)  # "private" was not subscribed
        await page.disconnect()

    run(main(), POLL_INTERVAL=60)  # no resync during the test: the changes came through the channel layer


def test_a_reconnecting_page_gets_only_what_changed(open_store, store_name):
    store = open_store()
    a, b = store.dvar("a", 0), store.dvar("b", 0)
    djstm.atomically(lambda: (a.write(1), b.write(1)))

    async def main():
        page = await connected(STAFF)
        await page.send_json_to({"subscribe": [{"store": store_name, "prefix": ""}],
                                 "versions": {f"{store_name}:a": 1, f"{store_name}:b": 0}})
        assert await page.receive_json_from(5) == {"store": store_name, "name": "b", "version": 1, "value": 1}
        assert await page.receive_nothing(0.3)
        await page.disconnect()

    run(main())


def test_a_change_without_notification_still_arrives(open_store, store_name):
    store = open_store()
    store.dvar("price", 12)

    async def main():
        page = await connected(STAFF)
        await page.send_json_to({"subscribe": [{"store": store_name, "name": "price"}]})
        assert (await page.receive_json_from(5))["version"] == 0
        await sync_to_async(bump_by_hand)(store_name, "price", "99")  # no notification: the resync finds it
        assert await page.receive_json_from(5) == {"store": store_name, "name": "price", "version": 1, "value": 99}
        await page.disconnect()

    run(main())


def test_a_refused_subscription_gets_an_error_not_silence(open_store, store_name):
    open_store().dvar("secret", "s3cr3t")

    async def main():
        page = await connected(AnonymousUser())
        await page.send_json_to({"subscribe": [{"store": store_name, "name": "secret"}]})
        refused = await page.receive_json_from(5)
        assert "not allowed" in refused["error"]
        assert await page.receive_nothing(0.7)  # and no value, not even after a resync
        await page.disconnect()

    run(main())


def test_a_page_connected_longer_than_the_group_expiry_keeps_receiving(store_name):
    """channels-redis's core layer forgets group members after group_expiry (2 s here); the consumer
    joins again as it goes, so a page open for longer still gets changes through the layer."""
    settings = {"CHANNEL_LAYER": "djstm-core", "POLL_INTERVAL": 1.0}
    with override_settings(DJSTM={**LIVE, **settings}):
        store = djstm.with_store(database=ALIAS, mode="distributed", name=store_name)
    try:
        price = store.dvar("price", 1)

        async def main():
            page = await connected(STAFF)
            await page.send_json_to({"subscribe": [{"store": store_name, "name": "price"}]})
            assert (await page.receive_json_from(5))["version"] == 0
            await asyncio.sleep(3.5)  # past the group expiry
            for version in (1, 2):
                await sync_to_async(djstm.atomically)(lambda: price.write(price.read() + 1))
                assert (await page.receive_json_from(5))["version"] == version
            await page.disconnect()

        run(main(), **settings)
    finally:
        store.close()


def test_a_prefix_reveals_only_the_dvars_the_rule_allows(open_store, store_name):
    store = open_store()
    store.dvar("public-price", 1)
    store.dvar("public-secret", 2)

    def rule(user, store, name):
        return name in ("public-", "public-price")

    async def main():
        page = await connected(AnonymousUser())
        await page.send_json_to({"subscribe": [{"store": store_name, "prefix": "public-"}]})
        assert (await page.receive_json_from(5))["name"] == "public-price"
        assert await page.receive_nothing(0.7)  # public-secret matched the prefix, but the rule refuses it
        await page.disconnect()

    run(main(), CAN_READ=rule)
