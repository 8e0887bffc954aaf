"""The demo backend's pure parts: SQL for uploads (--source postgres), record keys, topics."""

from __future__ import annotations

import pytest

from bucketsync.config import KafkaSettings, Settings
from bucketsync.demo_web import PostgresSource, UploadRejected, _key_id, sql_literal, topic_for


def pg_source() -> PostgresSource:
    return PostgresSource(
        Settings(), {"todos": "app.public.todos", "lists": "app.public.lists"}, users=2
    )


def test_sql_literals_quote_text_and_map_types() -> None:
    assert sql_literal(None) == "NULL"
    assert sql_literal(True) == "TRUE"
    assert sql_literal(3) == "3"
    assert sql_literal("it's; DROP TABLE todos") == "'it''s; DROP TABLE todos'"


def test_upload_entries_become_sql() -> None:
    src = pg_source()
    put = {"op": "PUT", "table": "todos", "id": "x1", "data": {"description": "a", "completed": 0}}
    table, rid, sql = src._statement("u1", put)
    assert (table, rid) == ("todos", "x1")
    assert sql.startswith("INSERT INTO todos (id, description, completed, owner_id) VALUES")
    assert "FALSE" in sql and "'u1'" in sql and sql.endswith("RETURNING id;")
    patch = {"op": "PATCH", "table": "todos", "id": "x1", "data": {"completed": 1, "evil": 1}}
    assert src._statement("u1", patch)[2] == (
        "UPDATE todos SET completed = TRUE WHERE id = 'x1' RETURNING id;"
    )
    delete = {"op": "DELETE", "table": "todos", "id": "x1"}
    assert src._statement("u1", delete)[2] == "DELETE FROM todos WHERE id = 'x1' RETURNING id;"
    with pytest.raises(UploadRejected):
        src._statement("u1", {"op": "PUT", "table": "users", "id": "u1", "data": {}})


def test_record_key_ids_with_and_without_schema() -> None:
    assert _key_id(b'{"id": "t1"}') == "t1"
    assert _key_id(b'{"schema": {}, "payload": {"id": 7}}') == "7"
    assert _key_id(None) is None
    assert _key_id(b"not json") is None


def test_demo_tables_are_named_like_the_first_topic() -> None:
    s = Settings(kafka=KafkaSettings(topics=["p.public.todos", "p.public.lists"]))
    assert topic_for(s, "lists") == "p.public.lists"
    assert topic_for(s, "memberships") is None
