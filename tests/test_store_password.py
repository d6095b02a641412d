"""The store's one password rule (`mmrank.store.store_password`), which the predictor, the operator
and the embedder all reach the store through: the password given (the operator's, from a Secret),
else the URL's own, else MMRANK_STORE_PASSWORD. Pure cases first, then the real Redis."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmrank.store import PASSWORD_ENV, open_store, redacted, redis_client, store_password, without_password

ENV = {PASSWORD_ENV: "from-env"}


@pytest.mark.parametrize(
    ("url", "given", "env", "chosen"),
    [
        ("redis://store:6379/0", "p@ss/word", {}, "p@ss/word"),  # the Secret's, as given
        ("redis://store:6379/0", "secret", ENV, "secret"),  # given beats the environment
        ("redis://:own@store:6379/0", "secret", ENV, "secret"),  # given beats the URL's own
        ("redis://:own@store:6379/0", None, ENV, "own"),  # the URL's own beats the environment
        ("redis://:p%40ss%2Fword@store:6379/0", None, {}, "p@ss/word"),  # percent-decoded, as redis-py reads it
        ("redis://user:own@store:6379/0", None, {}, "own"),
        ("redis://store:6379/0", None, ENV, "from-env"),  # what the operator's pods get
        ("redis://user@store:6379/0", "", ENV, "from-env"),  # an empty password is none
        ("redis://store:6379/0", None, {PASSWORD_ENV: ""}, None),
        ("redis://store:6379/0", None, {}, None),
    ],
)
def test_the_password_given_wins_then_the_urls_own_then_the_environment(
    url: str, given: str | None, env: dict[str, str], chosen: str | None
) -> None:
    assert store_password(url, given, env=env) == chosen


@pytest.mark.parametrize(
    ("url", "shown", "bare"),
    [
        ("redis://:p%40ss%2Fword@store:6379/0", "redis://:***@store:6379/0", "redis://store:6379/0"),
        ("redis://user:pw@store:6379/0", "redis://user:***@store:6379/0", "redis://user@store:6379/0"),
        ("rediss://:pw@[::1]:6380/2", "rediss://:***@[::1]:6380/2", "rediss://[::1]:6380/2"),
        ("redis://user@store:6379/0", "redis://user@store:6379/0", "redis://user@store:6379/0"),
        ("redis://store:6379/0", "redis://store:6379/0", "redis://store:6379/0"),
        ("file:///tmp/store", "file:///tmp/store", "file:///tmp/store"),
    ],
)
def test_no_password_reaches_a_log_or_the_clients_url(url: str, shown: str, bare: str) -> None:
    assert redacted(url) == shown and without_password(url) == bare


def test_the_client_gets_the_chosen_password_and_a_url_without_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """redis-py lets a password in the URL win over the one given beside it; the client here
    never sees the URL's, so the rule's choice is the one used."""
    monkeypatch.setenv(PASSWORD_ENV, "from-env")
    given = redis_client("redis://:own@store:6379/0", "secret")  # no connection until a command
    assert given.connection_pool.connection_kwargs["password"] == "secret"
    own = redis_client("redis://user:own@store:6379/0")
    assert own.connection_pool.connection_kwargs["password"] == "own"
    assert own.connection_pool.connection_kwargs["username"] == "user"
    assert redis_client("redis://store:6379/0").connection_pool.connection_kwargs["password"] == "from-env"


def test_a_file_store_takes_no_password(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path / 'store'}", password="ignored")
    store.create_space("e1", 4)
    assert store.spaces() == ["e1"]
    store.close()


def test_on_the_real_redis_the_given_password_beats_a_wrong_one_in_the_url(redis_client, redis_server) -> None:  # type: ignore[no-untyped-def]
    import redis

    redis_client.config_set("requirepass", "s3cret")
    wrong = redis_server.url.replace("redis://", "redis://:wrong@", 1)
    with pytest.raises(redis.AuthenticationError):
        open_store(wrong).spaces()
    store = open_store(wrong, password="s3cret")
    store.create_space("e1", 4)
    assert store.spaces() == ["e1"]
    store.close()
