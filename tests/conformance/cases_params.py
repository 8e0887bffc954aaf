"""Cases from legacy/parameter_queries.test.ts, legacy/static_parameter_queries.test.ts and
legacy/table_valued_function_queries.test.ts (edition 1)."""

from __future__ import annotations

from tests.conformance.harness import Case, Lookups, ParamRow, Request, Warnings, param_rules

PQ = "legacy/parameter_queries.test.ts > "
SP = "legacy/static_parameter_queries.test.ts > "
TV = "legacy/table_valued_function_queries.test.ts > "

FALSE_LOOKUP = "false-condition-lookup"
DANGER = "client parameters"


def pq(
    name: str, sql: str, checks: list, *, accept: bool = False, error: str | None = None
) -> Case:
    return Case(PQ + name, param_rules(sql, accept_dangerous=accept), checks, error=error)


def sp(name: str, sql: str, checks: list, *, accept: bool = False) -> Case:
    return Case(SP + name, param_rules(sql, accept_dangerous=accept), checks)


def tv(name: str, sql: str, checks: list, *, accept: bool = True) -> Case:
    return Case(TV + name, param_rules(sql, accept_dangerous=accept), checks)


def rq(buckets: list[str], jwt: dict | None = None, params: dict | None = None, **kw) -> Request:
    return Request([(b, 3) for b in buckets], jwt=jwt or {}, params=params, **kw)


CASES: list[Case] = [
    # ------------------------------------------------------------------ parameter_queries
    pq(
        "token_parameters IN query",
        "SELECT id as group_id FROM groups WHERE token_parameters.user_id IN groups.user_ids",
        [
            Warnings([]),
            ParamRow(
                [(1, ["user1"], ["group1"]), (1, ["user2"], ["group1"])],
                table="groups",
                row={"id": "group1", "user_ids": '["user1","user2"]'},
            ),
            Lookups([["user1"]], jwt={"sub": "user1"}),
        ],
    ),
    pq(
        "IN token_parameters query",
        "SELECT id as region_id FROM regions WHERE name IN token_parameters.region_names",
        [
            ParamRow(
                [(1, ["colorado"], ["region1"])],
                table="regions",
                row={"id": "region1", "name": "colorado"},
            ),
            Lookups(
                [["colorado"], ["texas"]],
                jwt={"parameters": {"region_names": ["colorado", "texas"]}},
            ),
        ],
    ),
    pq(
        "queried numeric parameters",
        "SELECT users.int1, users.float1, users.float2 FROM users WHERE users.int1 = token_parameters.int1 "
        "AND users.float1 = token_parameters.float1 AND users.float2 = token_parameters.float2",
        [
            ParamRow(
                [(1, [314, 3.14, 314], [314, 3.14, 314])],
                table="users",
                row={"int1": 314, "float1": 3.14, "float2": 314.0},
            ),
            Lookups(
                [[314, 3.14, 314]], jwt={"parameters": {"int1": 314, "float1": 3.14, "float2": 314}}
            ),
            rq(
                ["mybucket[314,3.14,314]"],
                jwt={"parameters": {"int1": 314, "float1": 3.14, "float2": 314}},
                param_rows={"users": [{"int1": 314, "float1": 3.14, "float2": 314.0}]},
            ),
        ],
    ),
    pq(
        "plain token_parameter (baseline)",
        "SELECT id from users WHERE filter_param = token_parameters.user_id",
        [
            ParamRow(
                [(1, ["test_param"], ["test_id"])],
                table="users",
                row={"id": "test_id", "filter_param": "test_param"},
            ),
            Lookups([["test"]], jwt={"sub": "test"}),
        ],
    ),
    pq(
        "function on token_parameter",
        "SELECT id from users WHERE filter_param = upper(token_parameters.user_id)",
        [
            ParamRow(
                [(1, ["test_param"], ["test_id"])],
                table="users",
                row={"id": "test_id", "filter_param": "test_param"},
            ),
            Lookups([["TEST"]], jwt={"sub": "test"}),
        ],
    ),
    pq(
        "token parameter member operator",
        "SELECT id from users WHERE filter_param = token_parameters.some_param ->> 'description'",
        [
            ParamRow(
                [(1, ["test_param"], ["test_id"])],
                table="users",
                row={"id": "test_id", "filter_param": "test_param"},
            ),
            Lookups(
                [["test_description"]],
                jwt={"parameters": {"some_param": {"description": "test_description"}}},
            ),
        ],
    ),
    pq(
        "token parameter and binary operator",
        "SELECT id from users WHERE filter_param = token_parameters.some_param + 2",
        [Lookups([[5]], jwt={"parameters": {"some_param": 3}})],
    ),
    pq(
        "token parameter IS NULL as filter",
        "SELECT id from users WHERE filter_param = (token_parameters.some_param IS NULL)",
        [
            Lookups([[1]], jwt={"parameters": {"some_param": None}}),
            Lookups([[0]], jwt={"parameters": {"some_param": "test"}}),
        ],
    ),
    pq(
        "direct token parameter",
        "SELECT FROM users WHERE token_parameters.some_param",
        [
            ParamRow([(1, [1], [])], table="users", row={"id": "user1"}),
            Lookups(
                [[0]],
                ours=[],
                diff=FALSE_LOOKUP,
                jwt={"sub": "user1", "parameters": {"some_param": None}},
            ),
            Lookups([[1]], jwt={"sub": "user1", "parameters": {"some_param": 123}}),
            rq(
                ["mybucket[]"],
                jwt={"parameters": {"some_param": 123}},
                param_rows={"users": [{"id": "user1"}]},
            ),
        ],
    ),
    pq(
        "token parameter IS NULL",
        "SELECT FROM users WHERE token_parameters.some_param IS NULL",
        [
            ParamRow([(1, [1], [])], table="users", row={"id": "user1"}),
            Lookups([[1]], jwt={"sub": "user1", "parameters": {"some_param": None}}),
            Lookups(
                [[0]],
                ours=[],
                diff=FALSE_LOOKUP,
                jwt={"sub": "user1", "parameters": {"some_param": 123}},
            ),
        ],
    ),
    pq(
        "token parameter IS NOT NULL",
        "SELECT FROM users WHERE token_parameters.some_param IS NOT NULL",
        [
            ParamRow([(1, [1], [])], table="users", row={"id": "user1"}),
            Lookups(
                [[0]],
                ours=[],
                diff=FALSE_LOOKUP,
                jwt={"sub": "user1", "parameters": {"some_param": None}},
            ),
            Lookups([[1]], jwt={"sub": "user1", "parameters": {"some_param": 123}}),
        ],
    ),
    pq(
        "token parameter NOT",
        "SELECT FROM users WHERE NOT token_parameters.is_admin",
        [
            ParamRow([(1, [1], [])], table="users", row={"id": "user1"}),
            Lookups([[1]], jwt={"sub": "user1", "parameters": {"is_admin": False}}),
            Lookups(
                [[0]],
                ours=[],
                diff=FALSE_LOOKUP,
                jwt={"sub": "user1", "parameters": {"is_admin": 123}},
            ),
        ],
    ),
    pq(
        "row filter and token parameter IS NULL",
        "SELECT FROM users WHERE users.id = token_parameters.user_id AND token_parameters.some_param IS NULL",
        [
            ParamRow([(1, ["user1", 1], [])], table="users", row={"id": "user1"}),
            Lookups([["user1", 1]], jwt={"sub": "user1", "parameters": {"some_param": None}}),
            Lookups(
                [["user1", 0]],
                ours=[],
                diff=FALSE_LOOKUP,
                jwt={"sub": "user1", "parameters": {"some_param": 123}},
            ),
        ],
    ),
    pq(
        "row filter and direct token parameter",
        "SELECT FROM users WHERE users.id = token_parameters.user_id AND token_parameters.some_param",
        [
            ParamRow([(1, ["user1", 1], [])], table="users", row={"id": "user1"}),
            Lookups([["user1", 1]], jwt={"sub": "user1", "parameters": {"some_param": 123}}),
            Lookups(
                [["user1", 0]],
                ours=[],
                diff=FALSE_LOOKUP,
                jwt={"sub": "user1", "parameters": {"some_param": None}},
            ),
        ],
    ),
    pq(
        "cast",
        "SELECT FROM users WHERE users.id = cast(token_parameters.user_id as text)",
        [Lookups([["user1"]], jwt={"sub": "user1"}), Lookups([["123"]], jwt={"sub": 123})],
    ),
    pq(
        "IS NULL row filter",
        "SELECT id FROM users WHERE role IS NULL",
        [
            ParamRow([(1, [], ["user1"])], table="users", row={"id": "user1", "role": None}),
            Lookups([[]], jwt={"sub": "user1"}),
        ],
    ),
    pq(
        "token filter (1)",
        "SELECT FROM users WHERE users.id = token_parameters.user_id AND token_parameters.is_admin",
        [
            ParamRow([(1, ["user1", 1], [])], table="users", row={"id": "user1"}),
            Lookups([["user1", 1]], jwt={"sub": "user1", "parameters": {"is_admin": True}}),
            Lookups(
                [["user1", 0]],
                ours=[],
                diff=FALSE_LOOKUP,
                jwt={"sub": "user1", "parameters": {"is_admin": False}},
            ),
        ],
    ),
    pq(
        "token filter (2)",
        "SELECT users.id AS user_id, token_parameters.is_admin as is_admin FROM users "
        "WHERE users.id = token_parameters.user_id AND token_parameters.is_admin",
        [
            ParamRow([(1, ["user1", 1], ["user1"])], table="users", row={"id": "user1"}),
            Lookups([["user1", 1]], jwt={"sub": "user1", "parameters": {"is_admin": True}}),
            rq(
                ['mybucket["user1",1]'],
                jwt={"sub": "user1", "parameters": {"is_admin": True}},
                param_rows={"users": [{"id": "user1"}]},
            ),
        ],
    ),
    pq(
        "case-sensitive parameter queries (1)",
        'SELECT users."userId" AS user_id FROM users WHERE users."userId" = token_parameters.user_id',
        [
            Warnings([]),
            ParamRow([(1, ["user1"], ["user1"])], table="users", row={"userId": "user1"}),
        ],
    ),
    pq(
        "case-sensitive parameter queries (2)",
        "SELECT users.userId AS user_id FROM users WHERE users.userId = token_parameters.user_id",
        [
            Warnings(["userId", "userId"]),
            ParamRow([], table="users", row={"userId": "user1"}),
            ParamRow([(1, ["user1"], ["user1"])], table="users", row={"userid": "user1"}),
        ],
    ),
    pq(
        "case-sensitive parameter queries (3)",
        "SELECT user_id FROM users WHERE Users.user_id = token_parameters.user_id",
        [Warnings(["Users"])],
    ),
    pq(
        "case-sensitive parameter queries (4)",
        "SELECT Users.user_id FROM users WHERE user_id = token_parameters.user_id",
        [Warnings(["Users"])],
    ),
    pq(
        "case-sensitive parameter queries (5)",
        "SELECT user_id FROM Users WHERE user_id = token_parameters.user_id",
        [Warnings(["Users"])],
    ),
    pq("case-sensitive parameter queries (6)", "SELECT userId FROM users", [Warnings(["userId"])]),
    pq(
        "case-sensitive parameter queries (7)",
        "SELECT user_id as userId FROM users",
        [Warnings(["userId"])],
    ),
    pq(
        "dynamic global parameter query",
        "SELECT workspaces.id AS workspace_id FROM workspaces WHERE visibility = 'public'",
        [
            ParamRow(
                [(1, [], ["workspace1"])],
                table="workspaces",
                row={"id": "workspace1", "visibility": "public"},
            ),
            ParamRow([], table="workspaces", row={"id": "workspace1", "visibility": "private"}),
        ],
    ),
    pq(
        "multiple different functions on token_parameter with AND",
        "SELECT id from users WHERE filter_param = upper(token_parameters.user_id) AND filter_param = lower(token_parameters.user_id)",
        [
            ParamRow(
                [(1, ["test_param", "test_param"], ["test_id"])],
                table="users",
                row={"id": "test_id", "filter_param": "test_param"},
            ),
            Lookups([["TEST", "test"]], jwt={"sub": "test"}),
        ],
    ),
    pq(
        "multiple same functions on token_parameter with OR",
        "SELECT id from users WHERE filter_param1 = upper(token_parameters.user_id) OR filter_param2 = upper(token_parameters.user_id)",
        [
            ParamRow(
                [(1, ["test1"], ["test_id"]), (1, ["test2"], ["test_id"])],
                table="users",
                row={"id": "test_id", "filter_param1": "test1", "filter_param2": "test2"},
            ),
            Lookups([["TEST"]], jwt={"sub": "test"}),
        ],
    ),
    pq(
        "request.parameters()",
        "SELECT FROM posts WHERE category = request.parameters() ->> 'category_id'",
        [
            Warnings([]),
            ParamRow([(1, ["red"], [])], table="posts", row={"id": "group1", "category": "red"}),
            Lookups([["red"]], params={"category_id": "red"}),
        ],
        accept=True,
    ),
    pq(
        "nested request.parameters() (1)",
        "SELECT FROM posts WHERE category = request.parameters() -> 'details' ->> 'category'",
        [Lookups([["red"]], params={"details": {"category": "red"}})],
        accept=True,
    ),
    pq(
        "nested request.parameters() (2)",
        "SELECT FROM posts WHERE category = request.parameters() ->> 'details.category'",
        [Lookups([["red"]], params={"details": {"category": "red"}})],
        accept=True,
    ),
    pq(
        "IN request.parameters()",
        "SELECT id as region_id FROM regions WHERE name IN request.parameters() -> 'region_names'",
        [
            ParamRow(
                [(1, ["colorado"], ["region1"])],
                table="regions",
                row={"id": "region1", "name": "colorado"},
            ),
            Lookups([["colorado"], ["texas"]], params={"region_names": ["colorado", "texas"]}),
        ],
        accept=True,
    ),
    pq(
        "user_parameters in SELECT",
        "SELECT id, user_parameters.other_id as other_id FROM users WHERE id = token_parameters.user_id",
        [
            ParamRow([(1, ["user1"], ["user1"])], table="users", row={"id": "user1"}),
            Lookups([["user1"]], jwt={"sub": "user1"}, params={"other_id": "red"}),
            rq(
                ['mybucket["user1","red"]'],
                jwt={"sub": "user1"},
                params={"other_id": "red"},
                param_rows={"users": [{"id": "user1"}]},
            ),
        ],
        accept=True,
    ),
    pq(
        "request.parameters() in SELECT",
        "SELECT id, request.parameters() ->> 'other_id' as other_id FROM users WHERE id = token_parameters.user_id",
        [
            ParamRow([(1, ["user1"], ["user1"])], table="users", row={"id": "user1"}),
            Lookups([["user1"]], jwt={"sub": "user1"}, params={"other_id": "red"}),
        ],
        accept=True,
    ),
    pq(
        "request.jwt()",
        "SELECT FROM users WHERE id = request.jwt() ->> 'sub'",
        [Lookups([["user1"]], jwt={"sub": "user1"}), Lookups([[123]], jwt={"sub": 123})],
    ),
    pq(
        "request.user_id()",
        "SELECT FROM users WHERE id = request.user_id()",
        [
            Lookups([["user1"]], jwt={"sub": "user1"}),
            Lookups([[123]], jwt={"sub": 123}),
            Lookups([[1]], jwt={"sub": True}),
            Lookups([['{"foo":"123"}']], jwt={"sub": {"foo": "123"}}),
        ],
    ),
    pq(
        "custom hydrationState > for lookups",
        "SELECT id as group_id FROM groups WHERE token_parameters.user_id IN groups.user_ids",
        [
            ParamRow(
                [(1, ["test-user"], ["group1"]), (1, ["other-user"], ["group1"])],
                table="groups",
                row={"id": "group1", "user_ids": '["test-user","other-user"]'},
            ),
            Lookups([["test-user"]], jwt={"sub": "test-user"}),
        ],
    ),
    pq(
        "invalid OR in parameter queries",
        "SELECT workspaces.id AS workspace_id FROM workspaces WHERE workspaces.user_id = token_parameters.user_id OR visibility = 'public'",
        [],
        error="must use the same",
    ),
    pq(
        "invalid OR in parameter queries (2)",
        "SELECT id from users WHERE filter_param = upper(token_parameters.user_id) OR filter_param = lower(token_parameters.user_id)",
        [],
        error="must use the same",
    ),
    pq(
        "invalid parameter match clause (1)",
        "SELECT FROM users WHERE (id = token_parameters.user_id) = false",
        [],
        error="parameter comparison cannot be",
    ),
    pq(
        "invalid parameter match clause (2)",
        "SELECT FROM users WHERE NOT (id = token_parameters.user_id)",
        [],
        error="parameter comparison cannot be used inside an expression",
    ),
    pq(
        "invalid parameter match clause (3)",
        "SELECT FROM users WHERE token_parameters.start_at < users.created_at",
        [],
        error="cannot mix table columns and request values",
    ),
    pq(
        "invalid parameter match clause (4)",
        "SELECT FROM users WHERE json_extract(users.description, token_parameters.path)",
        [],
        error="cannot mix table columns and request values",
    ),
    pq(
        "invalid parameter match clause (5)",
        "SELECT (user_parameters.role = posts.roles) as r FROM posts",
        [],
        error="parameter comparison cannot be selected",
    ),
    pq(
        "invalid function schema",
        "SELECT FROM users WHERE something.length(users.id) = 0",
        [],
        error="unknown function 'something.length",
    ),
    # dangerous queries (parameter_queries.test.ts)
    *[
        pq(f"dangerous queries > {sql}", sql, [Warnings([DANGER] if dangerous else [])])
        for sql, dangerous in [
            ("SELECT id as user_id FROM users WHERE users.user_id = request.user_id()", False),
            (
                "SELECT request.jwt() ->> 'org_id' as org_id, id as project_id FROM projects WHERE id = request.parameters() ->> 'project_id'",
                False,
            ),
            (
                "SELECT id as project_id FROM projects WHERE org_id = request.jwt() ->> 'org_id' AND id = request.parameters() ->> 'project_id'",
                False,
            ),
            ("SELECT id as category_id FROM categories", False),
            (
                "SELECT id as project_id FROM projects WHERE id = request.parameters() ->> 'project_id' AND request.jwt() ->> 'role' = 'authenticated'",
                False,
            ),
            (
                "SELECT id as project_id FROM projects WHERE id = request.parameters() ->> 'project_id'",
                True,
            ),
            (
                "SELECT id as category_id, request.parameters() ->> 'project_id' as project_id FROM categories",
                True,
            ),
            (
                "SELECT id as category_id FROM categories WHERE request.parameters() ->> 'include_categories'",
                True,
            ),
        ]
    ],
    pq(
        "bucket priorities > valid definition",
        "SELECT id as group_id, 1 AS _priority FROM groups WHERE token_parameters.user_id IN groups.user_ids",
        [
            Warnings([]),
            ParamRow([(1, ["u1"], ["g1"])], table="groups", row={"id": "g1", "user_ids": '["u1"]'}),
            Request(
                [('mybucket["g1"]', 1)],
                jwt={"sub": "u1"},
                param_rows={"groups": [{"id": "g1", "user_ids": '["u1"]'}]},
            ),
        ],
    ),
    pq(
        "bucket priorities > valid definition, static query",
        "SELECT token_parameters.user_id, 0 AS _priority",
        [Warnings([]), Request([('mybucket["u1"]', 0)], jwt={"sub": "u1"})],
    ),
    pq(
        "bucket priorities > invalid dynamic query",
        "SELECT LENGTH(assets.name) AS _priority FROM assets",
        [],
        error="priority must be a simple integer literal",
    ),
    pq(
        "bucket priorities > invalid literal type",
        "SELECT 'very fast please' AS _priority",
        [],
        error="priority must be a simple integer literal",
    ),
    pq(
        "bucket priorities > invalid literal value",
        "SELECT 15 AS _priority",
        [],
        error="priority.*between 0 and 3",
    ),
    # ------------------------------------------------------------------ static parameter queries
    sp(
        "basic query",
        "SELECT token_parameters.user_id",
        [Warnings([]), rq(['mybucket["user1"]'], {"sub": "user1"})],
    ),
    sp("global query", "SELECT", [Warnings([]), rq(["mybucket[]"], {"sub": "user1"})]),
    sp(
        "query with filter",
        "SELECT token_parameters.user_id WHERE token_parameters.is_admin",
        [
            rq(['mybucket["user1"]'], {"sub": "user1", "parameters": {"is_admin": True}}),
            rq([], {"sub": "user1", "parameters": {"is_admin": False}}),
        ],
    ),
    sp(
        "function in select clause",
        "SELECT upper(token_parameters.user_id) as upper_id",
        [rq(['mybucket["USER1"]'], {"sub": "user1"})],
    ),
    sp(
        "function in filter clause",
        "SELECT WHERE upper(token_parameters.role) = 'ADMIN'",
        [
            rq(["mybucket[]"], {"sub": "admin", "parameters": {"role": "admin"}}),
            rq([], {"sub": "user", "parameters": {"role": "user"}}),
        ],
    ),
    sp(
        "comparison in filter clause",
        "SELECT WHERE token_parameters.id1 = token_parameters.id2",
        [
            rq(["mybucket[]"], {"parameters": {"id1": "t1", "id2": "t1"}}),
            rq([], {"parameters": {"id1": "t1", "id2": "t2"}}),
        ],
    ),
    sp(
        "request.parameters()",
        "SELECT request.parameters() ->> 'org_id' as org_id",
        [Warnings([]), rq(['mybucket["test"]'], {}, {"org_id": "test"})],
        accept=True,
    ),
    *[
        sp(
            name,
            sql,
            [
                Warnings([]),
                rq(['mybucket["user1"]'], {claim: "user1"}),
                rq(["mybucket[123]"], {claim: 123}),
                rq(["mybucket[1]"], {claim: True}),
                rq(['mybucket["{\\"a\\":123.0}"]'], {claim: {"a": 123}}),
            ],
        )
        for name, sql, claim in [
            ("request.jwt() ->> 'sub'", "SELECT request.jwt() ->> 'sub' as user_id", "sub"),
            ("request.jwt() ->> 'other'", "SELECT request.jwt() ->> 'other' as user_id", "other"),
            ("request.user_id()", "SELECT request.user_id() as user_id", "sub"),
        ]
    ],
    sp(
        "request.jwt() ->> '$.sub.email'",
        "SELECT request.jwt() ->> 'sub.email' as email",
        [rq(['mybucket["a@example.org"]'], {"sub": {"email": "a@example.org"}})],
    ),
    sp(
        "typeof request.user_id()",
        "SELECT typeof(request.user_id()) as user_id",
        [
            rq(['mybucket["text"]'], {"sub": "123"}),
            rq(['mybucket["real"]'], {"sub": 123}),
            rq(['mybucket["integer"]'], {"sub": True}),
        ],
    ),
    sp("static value", "SELECT WHERE 1", [rq(["mybucket[]"])]),
    sp("static expression (1)", "SELECT WHERE 1 = 1", [rq(["mybucket[]"])]),
    sp("static expression (2)", "SELECT WHERE 1 != 1", [rq([])]),
    sp(
        "static IN expression",
        """SELECT WHERE 'admin' IN '["admin", "superuser"]'""",
        [rq(["mybucket[]"])],
    ),
    sp(
        "IN for permissions in request.jwt() (1)",
        "SELECT 'read:users' IN (request.jwt() ->> 'permissions') as access_granted",
        [
            rq(["mybucket[1]"], {"sub": "", "permissions": ["write", "read:users"]}),
            rq(["mybucket[0]"], {"sub": "", "permissions": ["write", "write:users"]}),
        ],
    ),
    sp(
        "IN for permissions in request.jwt() (2)",
        "SELECT WHERE 'read:users' IN (request.jwt() ->> 'permissions')",
        [
            rq(["mybucket[]"], {"sub": "", "permissions": ["write", "read:users"]}),
            rq([], {"sub": "", "permissions": ["write", "write:users"]}),
        ],
    ),
    sp(
        "IN for permissions in request.jwt() (3)",
        """SELECT WHERE request.jwt() ->> 'role' IN '["admin", "superuser"]'""",
        [rq(["mybucket[]"], {"role": "superuser"}), rq([], {"role": "superadmin"})],
    ),
    sp(
        "case-sensitive queries (1)", "SELECT request.user_id() as USER_ID", [Warnings(["USER_ID"])]
    ),
    *[
        sp(f"dangerous queries > {sql}", sql, [Warnings([DANGER] if dangerous else [])])
        for sql, dangerous in [
            ("select request.user_id() as user_id", False),
            ("select request.parameters() ->> 'project_id' as project_id", True),
            (
                "select request.user_id() as user_id, request.parameters() ->> 'project_id' as project_id",
                False,
            ),
            ("select where request.parameters() ->> 'include_comments'", True),
            ("select where request.jwt() ->> 'role' = 'authenticated'", False),
            (
                "select request.user_id() as user_id where request.jwt() ->> 'role' = 'authenticated'",
                False,
            ),
            (
                "select request.parameters() ->> 'project_id' as project_id where request.jwt() ->> 'role' = 'authenticated'",
                True,
            ),
        ]
    ],
    # ------------------------------------------------------------------ table-valued functions
    tv(
        "json_each(array param)",
        "SELECT json_each.value as v FROM json_each(request.parameters() -> 'array')",
        [
            Warnings([]),
            rq(
                ["mybucket[1]", "mybucket[2]", "mybucket[3]", 'mybucket["null"]'],
                {},
                {"array": [1, 2, 3, None]},
                ours=[
                    (b, 3) for b in ["mybucket[1]", "mybucket[2]", "mybucket[3]", "mybucket[null]"]
                ],
                diff="legacy-json-null",
            ),
        ],
    ),
    Case(
        TV + "json_each(array param), fixed json",
        "config:\n  fixed_json_extract: true\n"
        + param_rules(
            "SELECT json_each.value as v FROM json_each(request.parameters() -> 'array')",
            accept_dangerous=True,
        ),
        [
            rq(
                ["mybucket[1]", "mybucket[2]", "mybucket[3]", "mybucket[null]"],
                {},
                {"array": [1, 2, 3, None]},
            )
        ],
    ),
    tv(
        "json_each(static string)",
        "SELECT json_each.value as v FROM json_each('[1,2,3]')",
        [rq(["mybucket[1]", "mybucket[2]", "mybucket[3]"])],
    ),
    tv("json_each(null)", "SELECT json_each.value as v FROM json_each(null)", [rq([])]),
    tv(
        "json_each(array param not present)",
        "SELECT json_each.value as v FROM json_each(request.parameters() -> 'array_not_present')",
        [rq([])],
    ),
    tv(
        "json_each(array param not present, ifnull)",
        "SELECT json_each.value as v FROM json_each(ifnull(request.parameters() -> 'array_not_present', '[]'))",
        [rq([])],
    ),
    tv(
        "json_each on json_keys",
        """SELECT value FROM json_each(json_keys('{"a": [], "b": 2, "c": null}'))""",
        [rq(['mybucket["a"]', 'mybucket["b"]', 'mybucket["c"]'])],
    ),
    tv(
        "json_each with fn alias",
        "SELECT e.value FROM json_each(request.parameters() -> 'array') e",
        [rq(["mybucket[1]", "mybucket[2]", "mybucket[3]"], {}, {"array": [1, 2, 3]})],
    ),
    tv(
        "json_each with direct value",
        "SELECT value FROM json_each(request.parameters() -> 'array')",
        [rq(["mybucket[1]", "mybucket[2]", "mybucket[3]"], {}, {"array": [1, 2, 3]})],
    ),
    tv(
        "json_each in filters (1)",
        "SELECT value as v FROM json_each(request.parameters() -> 'array') e WHERE e.value >= 2",
        [rq(["mybucket[2]", "mybucket[3]"], {}, {"array": [1, 2, 3]})],
    ),
    tv(
        "json_each with nested json",
        "SELECT value ->> 'id' as project_id FROM json_each(request.jwt() -> 'projects') WHERE (value ->> 'role') = 'admin'",
        [
            rq(
                ["mybucket[1]"],
                {"projects": [{"id": 1, "role": "admin"}, {"id": 2, "role": "user"}]},
            )
        ],
    ),
    *[
        tv(
            f"dangerous queries > {sql}",
            sql,
            [Warnings([DANGER] if dangerous else [])],
            accept=False,
        )
        for sql, dangerous in [
            ("select value from json_each(request.user_id())", False),
            ("select value from json_each(request.parameters() ->> 'project_ids')", True),
            (
                "select request.user_id() as user_id, value FROM json_each(request.parameters() ->> 'project_ids')",
                False,
            ),
            (
                "select request.parameters() ->> 'something' as something, value as project_id FROM json_each(request.jwt() ->> 'project_ids')",
                False,
            ),
        ]
    ],
]
