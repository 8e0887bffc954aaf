"""Sync Streams cases (edition 2+/3) from legacy/streams.test.ts and the edition-3 grammar
fixture (grammar_parity/fixtures/new_compiler.yaml, ``query`` section).

The reference evaluates one stream named ``stream`` subscribed once (opaque id 0) with the
given subscription parameters. Lookups are compared by their request-side values and the
stored result (the reference's lookup scope names differ from our lookup keys: see
``lookup-key-scope`` in DIFFERENCES.md); queried bucket ids are compared as sets (the
reference lists static buckets before looked-up ones; ``bucket-order``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.rules import RulesError, SyncRules, parse_rules
from pipeline.rules.bucket_id import LOOKUP_SEPARATOR
from pipeline.rules.evaluate import StreamSubscription
from tests.conformance.harness import Case, Check

ST = "legacy/streams.test.ts > "
NC = "grammar_parity/fixtures/new_compiler.yaml > query/"


def stream_rules(sql: str, *, auto: bool = False, name: str = "stream") -> str:
    lines = ["config:", "  edition: 3", "streams:", f"  {name}:"]
    if auto:
        lines.append("    auto_subscribe: true")
    lines.append(f"    query: {json.dumps(sql)}")
    return "\n".join(lines) + "\n"


@dataclass
class Rows(Check):
    """``evaluateBucketIds``: the bucket ids a row lands in, in order."""

    table: str = ""
    row: Mapping[str, Any] = field(default_factory=dict)

    def run(self, rules: SyncRules) -> None:
        got = [o.bucket for o in rules.evaluate_row(self.table, self.row, schema="test_schema")]
        assert got == self.wanted, (got, self.wanted)


@dataclass
class Lookup(Check):
    """``evaluateParameterRow``: ``[(request values, [result])]``."""

    table: str = ""
    row: Mapping[str, Any] = field(default_factory=dict)

    def run(self, rules: SyncRules) -> None:
        got = [
            (json.loads(e.lookup.split(LOOKUP_SEPARATOR)[2]), list(e.values))
            for e in rules.evaluate_parameter_row(self.table, self.row, schema="test_schema")
        ]
        assert got == self.wanted, (got, self.wanted)


@dataclass
class Query(Check):
    """``queryBucketIds``: buckets of one subscription (as a set).

    ``sets`` maps the JSON array of a lookup's request values to the stored results.
    """

    token: Mapping[str, Any] = field(default_factory=dict)
    parameters: Mapping[str, Any] | None = None
    connection: Mapping[str, Any] = field(default_factory=dict)
    sets: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    keys: Sequence[Any] | None = None  # expected lookup request values (in any order)
    stream: str = "stream"

    def run(self, rules: SyncRules) -> None:
        plan = rules.plan_request(
            self.token,
            self.connection,
            include_defaults=False,
            subscriptions=[StreamSubscription(self.stream, self.parameters)],
        )
        assert all(not s.errors for s in plan.streams), plan.streams
        if self.keys is not None:
            got_keys = sorted(
                json.dumps(json.loads(k.split(LOOKUP_SEPARATOR)[2])) for k in plan.lookup_keys
            )
            assert got_keys == sorted(json.dumps(k) for k in self.keys), got_keys
        results: dict[str, list[tuple[Any, ...]]] = {}
        sets = {json.dumps(json.loads(k)): v for k, v in self.sets.items()}
        for k in plan.lookup_keys:
            values = json.dumps(json.loads(k.split(LOOKUP_SEPARATOR)[2]))
            results[k] = [(v,) for v in sets.get(values, ())]
        got = sorted(b.bucket for b in plan.buckets(results))
        assert got == sorted(self.wanted), (got, self.wanted)


@dataclass
class Warns(Check):
    def run(self, rules: SyncRules) -> None:
        assert any(self.wanted in w for w in rules.warnings), rules.warnings


def sc(name: str, sql: str, checks: list, **kw: Any) -> Case:
    return Case(ST + name, stream_rules(sql, auto=kw.pop("auto", False)), checks, **kw)


def err(name: str, sql: str, message: str, **kw: Any) -> Case:
    return Case(ST + name, stream_rules(sql), [], error=message, **kw)


C = "comments"
I = "issues"  # noqa: E741
U = "users"
F = "friends"

CASES: list[Case] = [
    Case(
        ST + "refuses edition: 1",
        "streams:\n  stream:\n    query: SELECT * FROM comments\n",
        [],
        error="edition",
    ),
    sc(
        "without filter",
        "SELECT * FROM comments",
        [Rows(["1#stream|0[]"], table=C, row={"id": "foo"}), Rows([], table=U, row={"id": "foo"})],
    ),
    sc(
        "row condition",
        "SELECT * FROM comments WHERE length(content) > 5",
        [
            Rows([], table=C, row={"id": "foo", "content": "a"}),
            Rows(["1#stream|0[]"], table=C, row={"id": "foo", "content": "aaaaaa"}),
        ],
    ),
    sc(
        "stream parameter",
        "SELECT * FROM comments WHERE issue_id = subscription.parameter('id')",
        [Rows(['1#stream|0["a"]'], table=C, row={"id": "foo", "issue_id": "a"})],
    ),
    sc(
        "row filter and stream parameter",
        "SELECT * FROM comments WHERE length(content) > 5 AND issue_id = subscription.parameter('id')",
        [
            Rows([], table=C, row={"id": "foo", "content": "a", "issue_id": "a"}),
            Rows(
                ['1#stream|0["i"]'],
                table=C,
                row={"id": "foo", "content": "aaaaaa", "issue_id": "i"},
            ),
            Query(['1#stream|0["subscribed_issue"]'], parameters={"id": "subscribed_issue"}),
        ],
    ),
    sc(
        "legacy token parameter",
        "SELECT * FROM issues WHERE owner_id = auth.parameter('$.parameters.test')",
        [Query(['1#stream|0["foo"]'], token={"parameters": {"test": "foo"}})],
    ),
    sc(
        "tracks source metadata on stream APIs",
        "SELECT * FROM comments WHERE issue_id = subscription.parameter('issue') OR issue_id IN "
        "(SELECT id FROM issues WHERE owner_id = auth.user_id())",
        [
            Rows(
                ['1#stream|0["i1"]', '1#stream|1["i1"]'],
                table=C,
                row={"id": "c1", "issue_id": "i1"},
            ),
            Lookup([(["u1"], ["i1"])], table=I, row={"id": "i1", "owner_id": "u1"}),
            Query(
                ['1#stream|0["i1"]', '1#stream|1["i1"]'],
                token={"sub": "u1"},
                parameters={"issue": "i1"},
                sets={'["u1"]': ["i1"]},
            ),
        ],
    ),
    sc(
        "or > parameter match or request condition",
        "SELECT * FROM issues WHERE owner_id = auth.user_id() OR auth.parameter('is_admin')",
        [
            Rows(
                ['1#stream|0["u1"]', "1#stream|1[]"], table=I, row={"id": "foo", "owner_id": "u1"}
            ),
            Query(['1#stream|0["u1"]'], token={"sub": "u1", "is_admin": False}),
            Query(['1#stream|0["u1"]', "1#stream|1[]"], token={"sub": "u1", "is_admin": True}),
        ],
    ),
    sc(
        "or > parameter match or row condition",
        "SELECT * FROM issues WHERE owner_id = auth.user_id() OR LENGTH(name) = 3",
        [
            Rows(['1#stream|0["a"]'], table=I, row={"id": "foo", "owner_id": "a", "name": ""}),
            Rows(
                ['1#stream|0["a"]', "1#stream|1[]"],
                table=I,
                row={"id": "foo", "owner_id": "a", "name": "aaa"},
            ),
            Query(['1#stream|0["u1"]', "1#stream|1[]"], token={"sub": "u1"}),
        ],
    ),
    sc(
        "or > row condition or parameter condition",
        "SELECT * FROM comments WHERE LENGTH(content) > 5 OR auth.parameter('is_admin')",
        [
            Rows(["1#stream|1[]"], table=C, row={"id": "foo", "content": "short"}),
            Rows(["1#stream|0[]", "1#stream|1[]"], table=C, row={"id": "foo", "content": "longer"}),
            Query(["1#stream|0[]"], token={"is_admin": False}),
            Query(["1#stream|0[]", "1#stream|1[]"], token={"is_admin": True}),
        ],
    ),
    sc(
        "or > row condition or row condition",
        "SELECT * FROM comments WHERE LENGTH(content) > 5 OR json_array_length(tagged_users) > 1",
        [
            Rows([], table=C, row={"id": "foo", "content": "short", "tagged_users": "[]"}),
            Rows(
                ["1#stream|0[]"],
                table=C,
                row={"id": "foo", "content": "longer", "tagged_users": "[]"},
            ),
            Rows(
                ["1#stream|0[]"],
                table=C,
                row={"id": "foo", "content": "longer", "tagged_users": '["a","b"]'},
            ),
            Rows(
                ["1#stream|0[]"],
                table=C,
                row={"id": "foo", "content": "short", "tagged_users": '["a","b"]'},
            ),
        ],
    ),
    sc(
        "or > request condition or request condition",
        "SELECT * FROM comments WHERE auth.parameter('a') OR auth.parameters() ->> 'b'",
        [
            Rows(["1#stream|0[]"], table=C, row={"id": "foo", "content": "whatever]"}),
            Query([], token={"a": False, "b": False}),
            Query(["1#stream|0[]"], token={"a": True, "b": False}),
        ],
    ),
    sc(
        "or > subquery or token parameter",
        "SELECT * FROM comments WHERE issue_id IN (SELECT id FROM issues WHERE owner_id = "
        "auth.user_id()) OR auth.parameter('is_admin')",
        [
            Rows(['1#stream|0["i1"]', "1#stream|1[]"], table=C, row={"id": "c", "issue_id": "i1"}),
            Lookup([(["u1"], ["i1"])], table=I, row={"id": "i1", "owner_id": "u1"}),
            Query(
                ['1#stream|0["i1"]'],
                token={"sub": "u1", "is_admin": False},
                sets={'["u1"]': ["i1"]},
                keys=[["u1"]],
            ),
            Query(
                ["1#stream|1[]", '1#stream|0["i1"]'],
                token={"sub": "u1", "is_admin": True},
                sets={'["u1"]': ["i1"]},
            ),
        ],
    ),
    sc(
        "in > row value in subquery",
        "SELECT * FROM comments WHERE issue_id IN (SELECT id FROM issues WHERE owner_id = auth.user_id())",
        [
            Lookup(
                [(["user1"], ["issue_id"])],
                table=I,
                row={"id": "issue_id", "owner_id": "user1", "name": "name"},
            ),
            Rows(['1#stream|0["issue_id"]'], table=C, row={"id": "c", "issue_id": "issue_id"}),
            Query(
                ['1#stream|0["issue_id"]'],
                token={"sub": "user1"},
                sets={'["user1"]': ["issue_id"]},
                keys=[["user1"]],
            ),
        ],
    ),
    sc(
        "in > parameter value in subquery",
        "SELECT * FROM issues WHERE auth.user_id() IN (SELECT id FROM users WHERE is_admin)",
        [
            Lookup(
                [(["u"], ["u"])],
                table=U,
                row={"id": "u", "is_admin": 1},
                diff="lookup-result-value",
                ours=[(["u"], [])],
            ),
            Lookup([], table=U, row={"id": "u", "is_admin": 0}),
            Lookup([], table=I, row={"id": "u", "owner_id": "x"}),
            Query(["1#stream|0[]"], token={"sub": "u"}, sets={'["u"]': ["u"]}, keys=[["u"]]),
            Query([], token={"sub": "u2"}, keys=[["u2"]]),
        ],
    ),
    sc(
        "in > two subqueries",
        "SELECT * FROM users WHERE id IN (SELECT user_a FROM friends WHERE user_b = auth.user_id()) OR "
        "id IN (SELECT user_b FROM friends WHERE user_a = auth.user_id())",
        [
            Rows(['1#stream|0["a"]', '1#stream|1["a"]'], table=U, row={"id": "a", "name": "a"}),
            Lookup([(["b"], ["a"]), (["a"], ["b"])], table=F, row={"user_a": "a", "user_b": "b"}),
        ],
    ),
    sc(
        "in > on parameter data",
        "SELECT * FROM comments WHERE issue_id IN (subscription.parameters() -> 'issue_id')",
        [
            Rows(['1#stream|0["i"]'], table=C, row={"id": "a", "issue_id": "i"}),
            Query(
                ['1#stream|0["i1"]', '1#stream|0["i2"]'],
                token={"sub": "a"},
                parameters={"issue_id": ["i1", "i2"]},
            ),
        ],
    ),
    sc(
        "in > on parameter data and table",
        "SELECT * FROM comments WHERE issue_id IN (SELECT id FROM issues WHERE owner_id = auth.user_id()) "
        "AND label IN (subscription.parameters() -> 'labels')",
        [
            Rows(['1#stream|0["i","l"]'], table=C, row={"id": "a", "issue_id": "i", "label": "l"}),
            Query(
                [
                    '1#stream|0["i1","l1"]',
                    '1#stream|0["i1","l2"]',
                    '1#stream|0["i2","l1"]',
                    '1#stream|0["i2","l2"]',
                ],
                token={"sub": "a"},
                parameters={"labels": ["l1", "l2"]},
                sets={'["a"]': ["i1", "i2"]},
                keys=[["a"]],
            ),
        ],
    ),
    sc(
        "in > parameter and auth match on same column",
        "SELECT * FROM comments WHERE issue_id = subscription.parameter('issue') AND issue_id IN "
        "auth.parameter('issues')",
        [
            Rows(['1#stream|0["i","i"]'], table=C, row={"id": "a", "issue_id": "i"}),
            Query([], token={"sub": "a"}, parameters={"issue": "i"}),
            Query(
                ['1#stream|0["i","i"]', '1#stream|0["i","i2"]'],
                token={"sub": "a", "issues": ["i", "i2"]},
                parameters={"issue": "i"},
            ),
        ],
    ),
    Case(
        ST + "overlap > row value in subquery",
        stream_rules(
            "SELECT * FROM comments WHERE tagged_users && (SELECT user_a FROM friends WHERE "
            "user_b = auth.user_id())"
        ),
        [
            Lookup([(["b"], ["a"])], table=F, row={"user_a": "a", "user_b": "b"}),
            Rows(
                ['1#stream|0["a"]', '1#stream|0["b"]'],
                table=C,
                row={"id": "c", "tagged_users": '["a", "b"]'},
            ),
            Query(
                ['1#stream|0["issue_id"]'],
                token={"sub": "user1"},
                sets={'["user1"]': ["issue_id"]},
                keys=[["user1"]],
            ),
        ],
    ),
    Case(
        ST + "overlap > token array against literal (request filter)",
        stream_rules("SELECT * FROM comments WHERE auth.parameters() -> 'tags' && '[\"foo\"]'"),
        [
            Query(wanted, token={"sub": "u1", "tags": tags})
            for tags, wanted in [
                (["foo"], ["1#stream|0[]"]),
                (["bar", "foo"], ["1#stream|0[]"]),
                (["bar"], []),
                ([], []),
                (["0"], []),  # an index-like string must not satisfy the filter
            ]
        ],
    ),
    err(
        "errors > IN operator with static left clause",
        "SELECT * FROM issues WHERE 'static' IN (SELECT id FROM users WHERE is_admin)",
        "the left operand must either depend on the row to sync or stream parameters",
    ),
    err(
        "errors > negated subquery",
        "select * from comments where issue_id not in (select id from issues where owner_id = auth.user_id())",
        "Negations are not allowed here",
    ),
    err(
        "errors > negated subquery from outer not operator",
        "select * from comments where not (issue_id in (select id from issues where owner_id = auth.user_id()))",
        "Negations are not allowed here",
    ),
    err(
        "errors > OR in subquery",
        "select * from comments where issue_id in (select id from issues where owner_id = auth.user_id() or name = 'test')",
        "Stream subqueries can't use OR filters",
    ),
    err(
        "errors > nested subqueries",
        "select * from comments where issue_id in (select id from issues where owner_id in (select id from users where is_admin))",
        "Unsupported condition for stream subqueries",
    ),
    err(
        "errors > subquery with two columns",
        "select * from comments where issue_id in (select id, owner_id from issues where owner_id = auth.user_id())",
        "This subquery must return exactly one column",
    ),
    err(
        "errors > legacy request function",
        "select * from issues where owner_id = request.user_id()",
        r"Function 'request.user_id' is not defined",
    ),
    sc(
        "errors > auto-subscribe with parameters > in simple filter",
        "SELECT * FROM issues WHERE id = subscription.parameter('s')",
        [Warns("Clients subscribe to this stream by default, but it uses subscription parameters")],
        auto=True,
    ),
    sc(
        "errors > auto-subscribe with parameters > in subquery",
        "SELECT * FROM issues WHERE owner_id IN (SELECT id FROM \"users\" WHERE id = subscription.parameter('s'))",
        [Warns("Clients subscribe to this stream by default, but it uses subscription parameters")],
        auto=True,
    ),
    sc(
        "normalization > double negation",
        "select * from comments where NOT (issue_id not in (select id from issues where owner_id = auth.user_id()))",
        [
            Lookup(
                [(["user1"], ["issue_id"])],
                table=I,
                row={"id": "issue_id", "owner_id": "user1", "name": "name"},
            ),
            Rows(['1#stream|0["issue_id"]'], table=C, row={"id": "c", "issue_id": "issue_id"}),
        ],
    ),
    err(
        "normalization > negated or",
        "select * from comments where not (issue_id in (select id from issues where owner_id = auth.user_id()) or auth.parameter('is_admin'))",
        "Negations are not allowed here",
    ),
    err(
        "normalization > negated and",
        "select * from comments where not (issue_id in (select id from issues where owner_id = auth.user_id()) and auth.parameter('is_admin'))",
        "Negations are not allowed here",
    ),
    sc(
        "normalization > distribute and",
        "select * from comments where (issue_id in (select id from issues where owner_id = auth.user_id()) "
        "or auth.parameter('is_admin')) and length(content) > 2",
        [
            Rows(
                ['1#stream|0["i"]', "1#stream|1[]"],
                table=C,
                row={"id": "c", "issue_id": "i", "content": "abc"},
            ),
            Rows([], table=C, row={"id": "c", "issue_id": "i", "content": "a"}),
        ],
    ),
    sc(
        "regression tests > subquery IN static array",
        "SELECT id, first_name, last_name, profile_image_url FROM users WHERE id IN ("
        "SELECT user_id FROM team_members WHERE team_id = connection.parameter('team_id') "
        'AND role IN \'["owner", "member"]\' AND deleted_at IS NULL)',
        [
            Rows(['1#stream|0["user"]'], table=U, row={"id": "user", "first_name": "Test"}),
            Lookup(
                [(["team"], ["user"])],
                table="team_members",
                row={"user_id": "user", "team_id": "team", "role": "owner"},
            ),
            Lookup(
                [],
                table="team_members",
                row={"user_id": "user", "team_id": "team", "role": "another"},
            ),
            Lookup(
                [],
                table="team_members",
                row={"user_id": "user", "team_id": "team", "role": "owner", "deleted_at": "1"},
            ),
            Query(
                ['1#stream|0["user"]'],
                parameters={"project": "foo"},
                connection={"team_id": "team"},
                sets={'["team"]': ["user"]},
                keys=[["team"]],
            ),
        ],
    ),
    sc(
        "regression tests > multiple matchers in subquery",
        'SELECT _id as id, * FROM "Scene" WHERE project IN (SELECT project FROM "ProjectInvitation" '
        "WHERE \"appliedTo\" != '' AND (auth.parameters() ->> 'haystack_id') IN \"appliedTo\" "
        "AND project = subscription.parameter('project') AND \"status\" = 'CLAIMED')",
        [
            Lookup(
                [([1, "foo"], ["foo"]), ([2, "foo"], ["foo"])],
                table="ProjectInvitation",
                row={"project": "foo", "appliedTo": "[1,2]", "status": "CLAIMED"},
            ),
            Query(
                ['1#stream|0["foo"]'],
                token={"sub": "user1", "haystack_id": 1},
                parameters={"project": "foo"},
                sets={'[1,"foo"]': ["foo"]},
                keys=[[1, "foo"]],
            ),
        ],
    ),
]


# ---- new_compiler.yaml, query section: accepted / rejected (edition 3) ----

_ACCEPTED = [
    "SELECT * FROM users",
    "SELECT u.* FROM users AS u JOIN orgs AS o ON u.org_id = o.id WHERE o.owner_id = auth.user_id()",
    "SELECT id FROM users",
    "SELECT u.id FROM users AS u",
    "SELECT u.id, u.org_id FROM users AS u",
    "SELECT CAST(u.id AS text) AS id_text FROM users AS u",
    "SELECT CASE WHEN u.id IS NULL THEN 'x' ELSE 'y' END AS state FROM users AS u",
    "SELECT u.* FROM users AS u INNER JOIN orgs AS o ON u.org_id = o.id",
    "SELECT u.* FROM users AS u JOIN orgs AS o ON u.org_id = o.id",
    "SELECT u.* FROM users AS u JOIN orgs AS o ON u.org_id = o.id WHERE o.owner_id = auth.parameter('owner_id')",
    "SELECT * FROM users WHERE id IS NOT NULL",
    "SELECT * FROM users WHERE id = id",
    "SELECT * FROM users WHERE id IN (SELECT id FROM users)",
    "SELECT * FROM users WHERE id IN (SELECT id FROM users WHERE id IS NOT NULL)",
    "SELECT * FROM users WHERE id BETWEEN 1 AND 10",
    "SELECT * FROM users WHERE id NOT BETWEEN 1 AND 10",
    "SELECT * FROM users WHERE auth.user_id() IS NOT NULL",
    "SELECT * FROM users WHERE auth.parameter('tenant') IS NOT NULL",
    "SELECT * FROM users WHERE subscription.parameter('plan') IS NOT NULL",
    "SELECT * FROM users WHERE connection.parameter('id') IS NOT NULL",
    "SELECT u.id FROM users AS u WHERE (u.id = u.id)",
    "SELECT u.id FROM users AS u WHERE (u.id = auth.parameter('id'))",
    "SELECT u.id FROM users AS u WHERE (u.id = connection.parameter('id'))",
    "SELECT u.id FROM users AS u WHERE (u.id = subscription.parameter('id'))",
    "SELECT u.id FROM users AS u WHERE u.id IN (SELECT id FROM users AS x)",
    "SELECT * FROM users WHERE id && (SELECT id FROM users WHERE id IS NOT NULL)",
    "SELECT * FROM comments WHERE status = 'active'",
    "SELECT * FROM comments WHERE deleted_at IS NULL",
    "SELECT * FROM comments WHERE owner_id = auth.user_id()",
    "SELECT * FROM comments WHERE region = connection.parameter('region')",
    "SELECT * FROM comments WHERE owner_id = auth.user_id() AND org_id = auth.parameter('org_id')",
    "SELECT * FROM comments WHERE owner_id = auth.user_id() AND status = 'active'",
    "SELECT * FROM comments WHERE list_id = subscription.parameter('list_id') AND list_id IN (SELECT id FROM lists WHERE owner_id = auth.user_id())",
    "SELECT * FROM comments WHERE owner_id = auth.user_id() OR shared_with = auth.user_id()",
    "SELECT * FROM comments WHERE status = 'active' AND (owner_id = auth.user_id() OR shared_with = auth.user_id())",
    "SELECT * FROM comments WHERE deleted_at IS NOT NULL",
    'SELECT * FROM comments WHERE category IN \'["draft", "hidden"]\'',
    "SELECT * FROM comments WHERE status != 'archived'",
]
_REJECTED = [
    ('SELECT * FROM users WHERE id = auth.parameter("id")', None),
    ("SELECT u.* FROM users u FULL JOIN orgs o ON u.org_id = o.id", "JOIN"),
    ("SELECT u.* FROM users u INNER JOIN orgs USING (org_id)", "USING"),
    ("SELECT * FROM users ORDER BY id", "ORDER BY"),
]
_OPEN_ACCEPTED: dict[str, str] = {}

for _i, _sql in enumerate(_ACCEPTED, 1):
    CASES.append(
        Case(f"{NC}accepted/{_i}: {_sql}", stream_rules(_sql), [], open_=_OPEN_ACCEPTED.get(_sql))
    )
for _i, (_sql, _msg) in enumerate(_REJECTED, 1):
    CASES.append(
        Case(f"{NC}rejected_syntax/{_i}: {_sql}", stream_rules(_sql), [], error=_msg or ".")
    )


# ---- YAML-level behaviour (sync-streams.md §1a) ----


def _yaml_case(name: str, text: str, check: Callable[[SyncRules], None]) -> Case:
    @dataclass
    class _Fn(Check):
        def run(self, rules: SyncRules) -> None:
            check(rules)

    return Case("sync-streams.md > " + name, text, [_Fn()])


def _cte_check(rules: SyncRules) -> None:
    assert [o.bucket for o in rules.evaluate_row("lists", {"id": "l1", "org_id": "o1"})] == [
        '1#lists|0["o1"]'
    ]
    assert [
        (e.lookup.split(LOOKUP_SEPARATOR)[2], e.values)
        for e in rules.evaluate_parameter_row("members", {"org_id": "o1", "user_id": "u1"})
    ] == [('["u1"]', ("o1",))]


CASES += [
    _yaml_case(
        "global with CTE, IN <cte>",
        "config:\n  edition: 3\nwith:\n  my_orgs: SELECT org_id FROM members WHERE user_id = auth.user_id()\n"
        "streams:\n  lists:\n    auto_subscribe: true\n    query: SELECT * FROM lists WHERE org_id IN my_orgs\n",
        _cte_check,
    ),
    _yaml_case(
        "stream with CTE shadows global",
        "config:\n  edition: 3\nwith:\n  my_orgs: SELECT id FROM nothing WHERE a = auth.user_id()\n"
        "streams:\n  lists:\n    with:\n      my_orgs: SELECT org_id FROM members WHERE user_id = auth.user_id()\n"
        "    query: SELECT * FROM lists WHERE org_id IN my_orgs\n",
        _cte_check,
    ),
    _yaml_case(
        "queries: one subscription, merged buckets",
        "config:\n  edition: 3\nstreams:\n  s:\n    priority: 1\n    queries:\n"
        "      - SELECT * FROM a WHERE owner = auth.user_id()\n      - SELECT * FROM b\n",
        lambda r: (
            (
                [d.name for d in r.streams[0].variants] == ["1#s|0", "1#s|1"]
                and r.streams[0].priority == 1
            )
            or (_ for _ in ()).throw(AssertionError(r.streams))
        ),
    ),
]


def _error_position() -> None:
    text = "config:\n  edition: 3\nstreams:\n  s:\n    query: SELECT * FROM t WHERE nope(x)\n"
    try:
        parse_rules(text)
    except RulesError as e:
        assert "stream 's', query 1" in str(e) and e.line == 5 and e.column == 34, (
            str(e),
            e.line,
            e.column,
        )
        return
    raise AssertionError("expected an error")


CASES.append(
    _yaml_case(
        "errors name stream, query, line and column",
        "config:\n  edition: 3\nstreams:\n  s:\n    query: SELECT * FROM t\n",
        lambda r: _error_position(),
    )
)
