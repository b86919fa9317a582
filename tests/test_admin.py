"""The DVar admin: list, search, filter, edit checked against the type and the loaded version, add, delete."""

import re
import uuid

import pytest
from django.contrib.admin.models import ADDITION, DELETION, LogEntry
from django.test.utils import override_settings

import djstm
from djstm.models import DVarRecord
from tests.distributed.conftest import ALIAS, stored

@pytest.fixture(scope="module")
def _project_database(distributed_schema, django_db_blocker):
    """The project's own databases, as a running site has them: no test database, no wrapping transaction.

    (The default database is a scratch file of this test run; see tests/settings.py.)
    """
    from django.core.management import call_command

    with django_db_blocker.unblock():
        call_command("migrate", verbosity=0)


@pytest.fixture(autouse=True)
def _database_allowed(_project_database, direct_database_access):
    """Every test here reaches the databases directly."""


@pytest.fixture
def admin_client():
    from django.contrib.auth import get_user_model
    from django.test import Client

    user, _ = get_user_model().objects.get_or_create(
        username="admin", defaults={"is_staff": True, "is_superuser": True}
    )
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def client():
    from django.test import Client

    return Client()


@pytest.fixture
def shop():
    name = f"admin-{uuid.uuid4().hex[:10]}"
    with override_settings(DJSTM={"CHANNEL_LAYER": "djstm", "ADMIN_DATABASE": ALIAS}):
        store = djstm.with_store(database=ALIAS, mode="distributed", name=name)
        store.dvar("price", 12)
        store.dvar("banner", "<img src=x onerror=alert(1)>")
        yield store
        store.close()


def change_url(store, name):
    pk = DVarRecord.objects.using(ALIAS).get(store=store.name, name=name).pk
    return f"/admin/djstm/dvarrecord/{pk}/change/"


def loaded_version(page):
    return int(re.search(r'name="loaded_version" value="(\d+)"', page).group(1))


def test_the_list_shows_filters_and_searches(admin_client, shop):
    page = admin_client.get("/admin/djstm/dvarrecord/", {"store": shop.name, "q": "pri"}).content.decode()
    assert "price" in page and "banner" not in page.split("result_list")[1]


def test_a_value_is_shown_as_text_never_as_html(admin_client, shop):
    page = admin_client.get(change_url(shop, "banner")).content.decode()
    assert "<img src=x" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page


def test_an_edit_is_checked_against_the_type_and_saved_in_a_transaction(admin_client, shop):
    url = change_url(shop, "price")
    version = loaded_version(admin_client.get(url).content.decode())
    refused = admin_client.post(url, {"value": '"cheap"', "loaded_version": version})
    assert refused.status_code == 200 and "expected a value of type int" in refused.content.decode()
    assert stored(shop.name, "price") == ("12", 0)

    saved = admin_client.post(url, {"value": "15", "loaded_version": version})
    assert saved.status_code == 302
    assert stored(shop.name, "price") == ("15", 1)
    assert djstm.atomically(shop.dvar("price").read) == 15
    assert LogEntry.objects.filter(object_repr__endswith=":price").exists()


def test_a_form_opened_before_someone_else_saved_shows_the_conflict_and_saves_nothing(admin_client, shop):
    url = change_url(shop, "price")
    version = loaded_version(admin_client.get(url).content.decode())
    price = shop.dvar("price")
    djstm.atomically(lambda: price.write(20))  # another worker, another tab
    response = admin_client.post(url, {"value": "15", "loaded_version": version})
    page = response.content.decode()
    assert response.status_code == 200 and "changed by someone else" in page and "now 1" in page
    assert stored(shop.name, "price") == ("20", 1)


def test_adding_and_deleting_a_dvar(admin_client, shop):
    added = admin_client.post(
        "/admin/djstm/dvarrecord/add/",
        {"store": shop.name, "name": "tags", "type_tag": "list[str]", "value": '["a", "b"]'},
    )
    assert added.status_code == 302, added.content.decode()[:2000]
    assert stored(shop.name, "tags") == ('["a","b"]', 0)
    assert shop.dvar("tags").peek() == ["a", "b"]
    refused = admin_client.post(
        "/admin/djstm/dvarrecord/add/", {"store": shop.name, "name": "n", "type_tag": "int", "value": "1.5"}
    )
    assert "expected a value of type int" in refused.content.decode()
    pk = DVarRecord.objects.using(ALIAS).get(store=shop.name, name="tags").pk
    deleted = admin_client.post(f"/admin/djstm/dvarrecord/{pk}/delete/", {"post": "yes"})
    assert deleted.status_code == 302
    assert stored(shop.name, "tags") is None
    history = LogEntry.objects.filter(object_id=str(pk)).order_by("action_time")
    assert [entry.action_flag for entry in history] == [ADDITION, DELETION]


def test_permissions_are_honoured(client, shop):
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Permission

    user = get_user_model().objects.create_user(f"viewer-{uuid.uuid4().hex[:8]}", password="pw", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_dvarrecord"))
    client.force_login(user)
    url = change_url(shop, "price")
    assert client.get(url).status_code == 200
    assert client.post(url, {"value": "1", "loaded_version": 0}).status_code == 403
    assert stored(shop.name, "price") == ("12", 0)


def edit_together_page(admin_client, shop, names):
    pks = [str(DVarRecord.objects.using(ALIAS).get(store=shop.name, name=n).pk) for n in names]
    response = admin_client.post(
        "/admin/djstm/dvarrecord/", {"action": "edit_together", "_selected_action": pks, "index": 0}
    )
    assert response.status_code == 302, response.content.decode()[:1000]
    page = admin_client.get("/admin/djstm/dvarrecord/" + response["Location"])
    return page.content.decode(), ",".join(sorted(pks, key=int))


def together_form(page, ids, values):
    form = {"ids": re.search(r'name="ids" value="([^"]*)"', page).group(1), "_save": "Save all"}
    for pk, version in re.findall(r'name="version-(\d+)" value="(\d+)"', page):
        form[f"version-{pk}"] = version
    for pk, value in values.items():
        form[f"value-{pk}"] = value
    return form


def test_several_dvars_edited_together_save_all_in_one_transaction(admin_client, shop):
    shop.dvar("stock", 5)
    page, ids = edit_together_page(admin_client, shop, ["price", "stock"])
    price_pk, stock_pk = (DVarRecord.objects.using(ALIAS).get(store=shop.name, name=n).pk for n in ("price", "stock"))
    saved = admin_client.post(
        "/admin/djstm/dvarrecord/edit-together/", together_form(page, ids, {price_pk: "20", stock_pk: "4"})
    )
    assert saved.status_code == 302
    assert (stored(shop.name, "price"), stored(shop.name, "stock")) == (("20", 1), ("4", 1))


def test_several_dvars_edited_together_save_none_if_one_changed_meanwhile(admin_client, shop):
    shop.dvar("stock", 5)
    page, ids = edit_together_page(admin_client, shop, ["price", "stock"])
    price_pk, stock_pk = (DVarRecord.objects.using(ALIAS).get(store=shop.name, name=n).pk for n in ("price", "stock"))
    stock = shop.dvar("stock")
    djstm.atomically(lambda: stock.write(3))  # someone else, meanwhile
    response = admin_client.post(
        "/admin/djstm/dvarrecord/edit-together/", together_form(page, ids, {price_pk: "20", stock_pk: "4"})
    )
    text = response.content.decode()
    assert response.status_code == 200 and "DVar &#x27;stock&#x27; was changed by someone else" in text
    assert (stored(shop.name, "price"), stored(shop.name, "stock")) == (("12", 0), ("3", 1))


def test_a_conflict_page_shows_the_stored_value_not_the_refused_one(admin_client, shop):
    url = change_url(shop, "price")
    version = loaded_version(admin_client.get(url).content.decode())
    price = shop.dvar("price")
    djstm.atomically(lambda: price.write(20))
    page = admin_client.post(url, {"value": "99", "loaded_version": version}).content.decode()
    assert re.search(r"<pre>20</pre>", page) and "<pre>99</pre>" not in page


def test_a_row_that_does_not_decode_can_be_repaired_in_the_admin(admin_client, shop):
    from tests.distributed.conftest import bump_by_hand

    bump_by_hand(shop.name, "price", '"broken"')
    url = change_url(shop, "price")
    version = loaded_version(admin_client.get(url).content.decode())
    assert admin_client.post(url, {"value": "30", "loaded_version": version}).status_code == 302
    assert stored(shop.name, "price") == ("30", 2)
