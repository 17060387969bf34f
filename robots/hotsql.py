"""Plain SQL for the statements a robot's HTTP requests run per episode (the token check, the upload's lock, quotas
and fenced updates), built once per shape from the models' metadata.

Why: through the ORM each of these compiled for 0.4-0.6 ms of CPU, against ~0.1 ms to run it (measured on
PostgreSQL; benchmarks/README.md, "Against the floor"), and an upload runs a dozen of them in the web process, whose
one core (its GIL) is what bounds ingest. The heartbeat path does the same (fleet._volatile_sql,
control._snapshot_sql).

What keeps them equal to the ORM's: every value goes through its field's own database preparation
(``get_db_prep_save``), so SQLite (UUIDs as 32 hex characters, datetimes as text) and PostgreSQL store and compare
exactly what the ORM would; rows come back as model instances through ``Model.from_db`` with the backend's and the
fields' converters applied; like ``QuerySet.update``, an UPDATE here touches no ``auto_now`` field and sends no signal.
The statement budgets of tests/robots/test_ingest.py count these like any other statement.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Optional

from django.db import connection, connections
from django.db.models import Model


def prep(model: type[Model], name: str, value: Any) -> Any:
    """``value`` of field ``name`` as the database takes it (a model instance for a foreign key: its pk)."""
    field = model._meta.get_field(name)
    if field.remote_field is not None and hasattr(value, "prepare_database_save"):
        value = value.prepare_database_save(field)
    return field.get_db_prep_save(value, connection)


def column(model: type[Model], name: str) -> str:
    return connection.ops.quote_name(model._meta.get_field(name).column)


def table(model: type[Model]) -> str:
    return connection.ops.quote_name(model._meta.db_table)


@functools.cache
def _update_sql(model: type[Model], names: tuple[str, ...], where: str) -> str:
    sets = ", ".join(f"{column(model, name)} = %s" for name in names)
    return f"UPDATE {table(model)} SET {sets} WHERE {where}"


def update(model: type[Model], values: dict[str, Any], where: str, where_params: Iterable[Any]) -> int:
    """``UPDATE model SET values WHERE where``; returns the rows changed. ``where`` is a constant SQL fragment with
    ``%s`` placeholders (its params already prepared, see ``prep``); it is part of the cache key, so never build it
    from data."""
    sql = _update_sql(model, tuple(values), where)
    params = [prep(model, name, value) for name, value in values.items()]
    with connection.cursor() as cursor:
        cursor.execute(sql, [*params, *where_params])
        return cursor.rowcount


@functools.cache
def _insert_sql(model: type[Model], ignore_conflicts: bool) -> str:
    fields = _insert_fields(model)
    sql = (f"INSERT INTO {table(model)} ({', '.join(connection.ops.quote_name(f.column) for f in fields)}) "
           f"VALUES ({', '.join(['%s'] * len(fields))})")
    # PostgreSQL and SQLite (>= 3.24) alike: a row that would break a unique constraint is skipped, not an error
    return sql + " ON CONFLICT DO NOTHING" if ignore_conflicts else sql


@functools.cache
def _insert_fields(model: type[Model]) -> list:
    return [f for f in model._meta.local_concrete_fields if f is not model._meta.auto_field]


def insert(obj: Model, ignore_conflicts: bool = False) -> bool:
    """INSERT ``obj`` as ``save()`` would (defaults, ``auto_now_add``; an auto-increment pk is left to the database
    and not read back); returns whether a row was inserted (False: ``ignore_conflicts`` and one existed)."""
    model = type(obj)
    params = [f.get_db_prep_save(f.pre_save(obj, True), connection) for f in _insert_fields(model)]
    with connection.cursor() as cursor:
        cursor.execute(_insert_sql(model, ignore_conflicts), params)
        inserted = cursor.rowcount == 1
    if inserted:
        obj._state.adding, obj._state.db = False, connection.alias
    return inserted


def scalar(sql: str, params: Iterable[Any]) -> Any:
    """The first column of the first row (None without a row)."""
    row = fetchone(sql, params)
    return None if row is None else row[0]


@functools.cache
def columns(model: type[Model], alias: str = "") -> str:
    """Every concrete column of ``model`` in field order (``alias.`` prefixed): what ``instance`` reads back."""
    prefix = f"{alias}." if alias else ""
    return ", ".join(prefix + connection.ops.quote_name(f.column) for f in model._meta.concrete_fields)


@functools.cache
def _converters(model: type[Model], alias: str) -> list[tuple[int, list]]:
    """What the ORM's compiler applies to each column as it reads a row. Built once per model and database, not per
    connection (threads have their own, and a server makes threads without end): a backend's converters read the
    settings (USE_TZ, the database's time zone), never the connection they were taken from."""
    ops = connections[alias].ops
    out = []
    for i, field in enumerate(model._meta.concrete_fields):
        found = ops.get_db_converters(field.cached_col) + field.get_db_converters(ops.connection)
        if found:
            out.append((i, found))
    return out


def instance(model: type[Model], row: tuple) -> tuple[Model, tuple]:
    """A row that starts with ``columns(model)``: the model instance (as the ORM would load it) and the rest."""
    fields = model._meta.concrete_fields
    values = list(row[:len(fields)])
    for i, converters in _converters(model, connection.alias):
        for converter in converters:
            values[i] = converter(values[i], fields[i].cached_col, connection)
    return model.from_db(connection.alias, [f.attname for f in fields], values), tuple(row[len(fields):])


def fetchone(sql: str, params: Iterable[Any]) -> Optional[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(sql, list(params))
        return cursor.fetchone()


def one(model: type[Model], where: str, params: Iterable[Any]) -> Optional[Model]:
    """The model instance of the first row ``where`` matches (every concrete field loaded), or None."""
    row = fetchone(f"SELECT {columns(model)} FROM {table(model)} WHERE {where}", params)
    return None if row is None else instance(model, row)[0]
