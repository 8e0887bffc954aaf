"""Cases from legacy/data_queries.test.ts and legacy/sync_rules.test.ts (edition 1)."""

from __future__ import annotations

from tests.conformance.harness import Case, Request, Row, Warnings, data_rules

DQ = "legacy/data_queries.test.ts > "
SR = "legacy/sync_rules.test.ts > "

A = "assets"

CASES: list[Case] = [
    # ------------------------------------------------------------------ data_queries
    Case(
        DQ + "bucket parameters = query",
        data_rules("SELECT * FROM assets WHERE assets.org_id = bucket.org_id", ["org_id"]),
        [
            Row(
                [('mybucket["org1"]', A, "asset1", {"id": "asset1", "org_id": "org1"})],
                table=A,
                row={"id": "asset1", "org_id": "org1"},
            ),
            Row([], table=A, row={"id": "asset1", "org_id": None}),
        ],
    ),
    Case(
        DQ + "bucket parameters IN query",
        data_rules("SELECT * FROM assets WHERE bucket.category IN assets.categories", ["category"]),
        [
            Row(
                [('mybucket["red"]', A, "asset1"), ('mybucket["green"]', A, "asset1")],
                table=A,
                row={"id": "asset1", "categories": '["red","green"]'},
                subset=True,
            ),
            Row([], table=A, row={"id": "asset1", "org_id": None}),
        ],
    ),
    Case(
        DQ + "static IN data query",
        data_rules("SELECT * FROM assets WHERE 'green' IN assets.categories"),
        [
            Row(
                [("mybucket[]", A, "asset1")],
                table=A,
                row={"id": "asset1", "categories": '["red","green"]'},
                subset=True,
            ),
            Row([], table=A, row={"id": "asset1", "categories": '["red","blue"]'}),
        ],
    ),
    Case(
        DQ + "data IN static query",
        data_rules("""SELECT * FROM assets WHERE assets.condition IN '["good","great"]'"""),
        [
            Row(
                [("mybucket[]", A, "asset1")],
                table=A,
                row={"id": "asset1", "condition": "good"},
                subset=True,
            ),
            Row([], table=A, row={"id": "asset1", "condition": "bad"}),
        ],
    ),
    Case(
        DQ + "table alias",
        data_rules(
            "SELECT * FROM assets as others WHERE others.org_id = bucket.org_id", ["org_id"]
        ),
        [
            Row(
                [('mybucket["org1"]', "others", "asset1", {"id": "asset1", "org_id": "org1"})],
                table=A,
                row={"id": "asset1", "org_id": "org1"},
            )
        ],
    ),
    Case(
        DQ + "invalid query - invalid IN",
        data_rules(
            "SELECT * FROM assets WHERE assets.category IN bucket.categories", ["categories"]
        ),
        error="right side of IN",
    ),
    Case(
        DQ + "invalid query - not all parameters used",
        data_rules("SELECT * FROM assets WHERE 1", ["org_id"]),
        error="does not tie bucket parameter 'org_id'",
    ),
    Case(
        DQ + "invalid query - parameter not defined",
        data_rules("SELECT * FROM assets WHERE assets.org_id = bucket.org_id"),
        error="unknown bucket parameter 'org_id'",
    ),
    Case(
        DQ + "invalid query - function on parameter (1)",
        data_rules("SELECT * FROM assets WHERE assets.org_id = upper(bucket.org_id)", ["org_id"]),
        error="can only be compared to the row",
    ),
    Case(
        DQ + "invalid query - function on parameter (2)",
        data_rules("SELECT * FROM assets WHERE assets.org_id = upper(bucket.org_id)"),
        error="unknown bucket parameter",
    ),
    Case(
        DQ + "invalid query - match clause in select",
        data_rules(
            "SELECT id, (bucket.org_id = assets.org_id) as org_matches FROM assets where org_id = bucket.org_id",
            ["org_id"],
        ),
        error="cannot be used in select columns",
    ),
    Case(
        DQ + "case-sensitive queries (1)",
        data_rules("SELECT * FROM Assets"),
        [Warnings(["Assets"])],
    ),
    Case(
        DQ + "case-sensitive queries (2)",
        data_rules("SELECT *, Name FROM assets"),
        [Warnings(["Name"])],
    ),
    Case(
        DQ + "case-sensitive queries (3)",
        data_rules("SELECT * FROM assets WHERE Archived = False"),
        [Warnings(["Archived"])],
    ),
    # ------------------------------------------------------------------ sync_rules
    Case(
        SR + "parse empty sync rules",
        "bucket_definitions: {}\n",
        [Request([], jwt={"sub": "u"}), Row([], table=A, row={"id": "a"})],
    ),
    Case(
        SR + "parse global sync rules",
        data_rules("SELECT id, description FROM assets"),
        [
            Row(
                [("mybucket[]", A, "asset1", {"id": "asset1", "description": "test"})],
                table=A,
                row={"id": "asset1", "description": "test"},
            ),
            Request([("mybucket[]", 3)]),
        ],
    ),
    Case(
        SR + "tracks source metadata on rows, lookups and bucket descriptions",
        """
bucket_definitions:
  mybucket:
    parameters:
      - SELECT token_parameters.user_id as user_id
      - SELECT users.id as user_id FROM users WHERE users.id = token_parameters.user_id
    data:
      - SELECT id FROM assets WHERE assets.user_id = bucket.user_id
""",
        [
            Request(
                [('mybucket["user1"]', 3)],
                jwt={"sub": "user1"},
                param_rows={"users": [{"id": "user1"}]},
            ),
            Row(
                [('mybucket["user1"]', A, "asset1", {"id": "asset1"})],
                table=A,
                row={"id": "asset1", "user_id": "user1"},
            ),
        ],
    ),
    Case(
        SR + "parse global sync rules with filter",
        """
bucket_definitions:
  mybucket:
    parameters: SELECT WHERE token_parameters.is_admin
    data: []
""",
        [
            Request([("mybucket[]", 3)], jwt={"parameters": {"is_admin": True}}),
            Request([], jwt={"parameters": {"is_admin": False}}),
            Request([], jwt={}),
            Request([("mybucket[]", 3)], jwt={"parameters": {"is_admin": 1}}),
            Request([], jwt={"parameters": {"is_admin": 0}}),
        ],
    ),
    Case(
        SR + "parse global sync rules with table filter",
        """
bucket_definitions:
  mybucket:
    parameters: SELECT FROM users WHERE users.id = token_parameters.user_id AND users.is_admin
    data: []
""",
        [
            Request(
                [("mybucket[]", 3)],
                jwt={"sub": "user1"},
                param_rows={"users": [{"id": "user1", "is_admin": 1}]},
            ),
            Request(
                [],
                jwt={"sub": "user1"},
                param_rows={"users": [{"id": "user1", "is_admin": 0}]},
            ),
        ],
    ),
    Case(
        SR + "parse bucket with parameters",
        """
bucket_definitions:
  mybucket:
    parameters: SELECT token_parameters.user_id, user_parameters.device_id
    accept_potentially_dangerous_queries: true
    data:
      - SELECT id, description FROM assets WHERE assets.user_id = bucket.user_id AND assets.device_id = bucket.device_id AND NOT assets.archived
""",
        [
            Request(
                [('mybucket["user1","device1"]', 3)],
                jwt={"sub": "user1"},
                params={"device_id": "device1"},
            ),
            Row(
                [
                    (
                        'mybucket["user1","device1"]',
                        A,
                        "asset1",
                        {"id": "asset1", "description": "test"},
                    )
                ],
                table=A,
                row={
                    "id": "asset1",
                    "description": "test",
                    "user_id": "user1",
                    "device_id": "device1",
                },
            ),
            Row(
                [],
                table=A,
                row={
                    "id": "asset1",
                    "description": "test",
                    "user_id": "user1",
                    "archived": 1,
                    "device_id": "device1",
                },
            ),
        ],
    ),
    Case(
        SR + "parse bucket with parameters and OR condition",
        """
bucket_definitions:
  mybucket:
    parameters: SELECT token_parameters.user_id
    data:
      - SELECT id, description FROM assets WHERE assets.user_id = bucket.user_id OR assets.owner_id = bucket.user_id
""",
        [
            Request([('mybucket["user1"]', 3)], jwt={"sub": "user1"}),
            Row(
                [('mybucket["user1"]', A, "asset1", {"id": "asset1", "description": "test"})],
                table=A,
                row={"id": "asset1", "description": "test", "user_id": "user1"},
            ),
            Row(
                [('mybucket["user1"]', A, "asset1", {"id": "asset1", "description": "test"})],
                table=A,
                row={"id": "asset1", "description": "test", "owner_id": "user1"},
            ),
        ],
    ),
    Case(
        SR + "parse bucket with parameters and invalid OR condition",
        """
bucket_definitions:
  mybucket:
    parameters: SELECT token_parameters.user_id
    data:
      - SELECT id, description FROM assets WHERE assets.user_id = bucket.user_id AND (assets.user_id = bucket.foo OR assets.other_id = bucket.bar)
""",
        error="unknown bucket parameter 'foo'",
    ),
    Case(
        SR + "reject unsupported queries (LIMIT)",
        "bucket_definitions:\n  mybucket:\n    parameters: SELECT token_parameters.user_id LIMIT 1\n    data: []\n",
        error="LIMIT is not supported",
    ),
    Case(
        SR + "reject unsupported queries (DISTINCT)",
        data_rules("SELECT DISTINCT id, description FROM assets"),
        error="DISTINCT is not supported",
    ),
    Case(
        SR + "reject unsupported queries (OFFSET)",
        "bucket_definitions:\n  mybucket:\n    parameters: SELECT token_parameters.user_id OFFSET 10\n    data: []\n",
        error="(LIMIT|OFFSET) is not supported",
    ),
    Case(
        SR + "reject unsupported queries (FOR UPDATE SKIP LOCKED)",
        "bucket_definitions:\n  mybucket:\n    parameters: SELECT token_parameters.user_id FOR UPDATE SKIP LOCKED\n    data: []\n",
        error="not supported|syntax error|unexpected",
    ),
    Case(
        SR + "reject unsupported queries (FOR UPDATE)",
        "bucket_definitions:\n  mybucket:\n    parameters: SELECT token_parameters.user_id FOR UPDATE\n    data: []\n",
        error="not supported|syntax error|unexpected",
    ),
    Case(
        SR + "reject unsupported queries (ORDER BY)",
        data_rules("SELECT id, description FROM assets ORDER BY id"),
        error="ORDER BY is not supported",
    ),
    Case(
        SR + "transforming things",
        """
bucket_definitions:
  mybucket:
    parameters: SELECT upper(token_parameters.user_id) AS user_id
    data:
      - SELECT id, upper(description) AS description_upper FROM assets WHERE upper(assets.user_id) = bucket.user_id AND NOT assets.archived
""",
        [
            Request([('mybucket["USER1"]', 3)], jwt={"sub": "user1"}),
            Row(
                [('mybucket["USER1"]', A, "asset1", {"id": "asset1", "description_upper": "TEST"})],
                table=A,
                row={"id": "asset1", "description": "test", "user_id": "user1"},
            ),
        ],
    ),
    Case(
        SR + "transforming things with upper-case functions",
        """
bucket_definitions:
  mybucket:
    parameters: SELECT UPPER(token_parameters.user_id) AS user_id
    data:
      - SELECT id, UPPER(description) AS description_upper FROM assets WHERE UPPER(assets.user_id) = bucket.user_id AND NOT assets.archived
""",
        [
            Request([('mybucket["USER1"]', 3)], jwt={"sub": "user1"}),
            Row(
                [('mybucket["USER1"]', A, "asset1", {"id": "asset1", "description_upper": "TEST"})],
                table=A,
                row={"id": "asset1", "description": "test", "user_id": "user1"},
            ),
        ],
    ),
    Case(
        SR + "transforming json",
        data_rules(
            "SELECT id, data ->> 'count' AS count, data -> 'bool' AS bool1, data ->> 'bool' AS bool2, "
            "'true' ->> '$' as bool3, json_extract(data, '$.bool') AS bool4 FROM assets"
        ),
        [
            Row(
                [
                    (
                        "mybucket[]",
                        A,
                        "asset1",
                        {
                            "id": "asset1",
                            "count": 5,
                            "bool1": "true",
                            "bool2": 1,
                            "bool3": 1,
                            "bool4": 1,
                        },
                    )
                ],
                table=A,
                row={"id": "asset1", "data": '{"count":5,"bool":true}'},
            )
        ],
    ),
    Case(
        SR + "IN json",
        """
bucket_definitions:
  mybucket:
    parameters: SELECT token_parameters.region_id
    data:
      - SELECT id, description FROM assets WHERE bucket.region_id IN assets.region_ids
""",
        [
            Row(
                [
                    ('mybucket["region1"]', A, "asset1", {"id": "asset1", "description": "test"}),
                    ('mybucket["region2"]', A, "asset1", {"id": "asset1", "description": "test"}),
                ],
                table=A,
                row={"id": "asset1", "description": "test", "region_ids": '["region1","region2"]'},
            )
        ],
    ),
    Case(
        SR + "direct boolean param",
        """
bucket_definitions:
  mybucket:
    parameters: SELECT token_parameters.is_admin
    data:
      - SELECT id, description, role, 'admin' as rule FROM assets WHERE bucket.is_admin
      - SELECT id, description, role, 'normal' as rule FROM assets WHERE (bucket.is_admin OR bucket.is_admin = false) AND assets.role != 'admin'
""",
        [
            Row(
                [
                    (
                        "mybucket[1]",
                        A,
                        "asset1",
                        {"id": "asset1", "description": "test", "role": "admin", "rule": "admin"},
                    )
                ],
                table=A,
                row={"id": "asset1", "description": "test", "role": "admin"},
            ),
            Row(
                [
                    (
                        "mybucket[1]",
                        A,
                        "asset2",
                        {"id": "asset2", "description": "test", "role": "normal", "rule": "admin"},
                    ),
                    (
                        "mybucket[1]",
                        A,
                        "asset2",
                        {"id": "asset2", "description": "test", "role": "normal", "rule": "normal"},
                    ),
                    (
                        "mybucket[0]",
                        A,
                        "asset2",
                        {"id": "asset2", "description": "test", "role": "normal", "rule": "normal"},
                    ),
                ],
                ours=[
                    (
                        "mybucket[1]",
                        A,
                        "asset2",
                        {"id": "asset2", "description": "test", "role": "normal", "rule": "admin"},
                    ),
                    (
                        "mybucket[0]",
                        A,
                        "asset2",
                        {"id": "asset2", "description": "test", "role": "normal", "rule": "normal"},
                    ),
                ],
                diff="same-row-twice-in-bucket",
                table=A,
                row={"id": "asset2", "description": "test", "role": "normal"},
            ),
            Request([("mybucket[1]", 3)], jwt={"parameters": {"is_admin": True}}),
        ],
    ),
    Case(
        SR + "some math",
        data_rules(
            "SELECT id, (5 / 2) AS int, (5 / 2.0) AS float, (CAST(5 AS real) / 2) AS float2 FROM assets"
        ),
        [
            Row(
                [
                    (
                        "mybucket[]",
                        A,
                        "asset1",
                        {"id": "asset1", "int": 2, "float": 2.5, "float2": 2.5},
                    )
                ],
                table=A,
                row={"id": "asset1"},
            )
        ],
    ),
    Case(
        SR + "bucket with static numeric parameters",
        """
bucket_definitions:
  mybucket:
    parameters: SELECT token_parameters.int1, token_parameters.float1, token_parameters.float2
    data:
      - SELECT id FROM assets WHERE assets.int1 = bucket.int1 AND assets.float1 = bucket.float1 AND assets.float2 = bucket.float2
""",
        [
            Request(
                [("mybucket[314,3.14,314]", 3)],
                jwt={"parameters": {"int1": 314, "float1": 3.14, "float2": 314}},
            ),
            Row(
                [("mybucket[314,3.14,314]", A, "asset1", {"id": "asset1"})],
                table=A,
                row={"id": "asset1", "int1": 314, "float1": 3.14, "float2": 314.0},
            ),
        ],
    ),
    Case(
        SR + "static parameter query with function on token_parameter",
        "bucket_definitions:\n  mybucket:\n    parameters: SELECT upper(token_parameters.user_id) as upper\n    data: []\n",
        [Warnings([]), Request([('mybucket["TEST"]', 3)], jwt={"sub": "test"})],
    ),
    Case(
        SR + "custom table and id",
        data_rules(
            [
                "SELECT client_id AS id, description, '1' as rule FROM assets_123 as assets WHERE assets.archived = false",
                "SELECT other_id AS id, description, '2' as rule FROM assets_123 as assets",
            ]
        ),
        [
            Row(
                [
                    (
                        "mybucket[]",
                        A,
                        "asset1",
                        {"id": "asset1", "description": "test", "rule": "1"},
                    ),
                    (
                        "mybucket[]",
                        A,
                        "other1",
                        {"id": "other1", "description": "test", "rule": "2"},
                    ),
                ],
                table="assets_123",
                row={
                    "client_id": "asset1",
                    "description": "test",
                    "archived": 0,
                    "other_id": "other1",
                },
            )
        ],
    ),
    Case(
        SR + "wildcard table",
        data_rules(
            'SELECT client_id AS id, description, _table_suffix as suffix, * FROM "assets_%" as assets '
            "WHERE assets.archived = false AND _table_suffix > '100'"
        ),
        [
            Row(
                [
                    (
                        "mybucket[]",
                        A,
                        "asset1",
                        {
                            "id": "asset1",
                            "description": "test",
                            "suffix": "123",
                            "archived": 0,
                            "client_id": "asset1",
                            "other_id": "other1",
                        },
                    )
                ],
                table="assets_123",
                row={
                    "client_id": "asset1",
                    "description": "test",
                    "archived": 0,
                    "other_id": "other1",
                },
            )
        ],
    ),
    Case(
        SR + "wildcard without alias",
        data_rules('SELECT *, _table_suffix as suffix, * FROM "%" WHERE archived = false'),
        [
            Row(
                [
                    (
                        "mybucket[]",
                        A,
                        "asset1",
                        {"id": "asset1", "description": "test", "suffix": "assets", "archived": 0},
                    )
                ],
                table=A,
                row={"id": "asset1", "description": "test", "archived": 0},
            )
        ],
    ),
    Case(
        SR + "should filter schemas",
        data_rules(
            [
                'SELECT id FROM "assets" as assets1',
                'SELECT id FROM "test_schema"."assets" as assets2',
                'SELECT id FROM "other"."assets" as assets4',
            ]
        ),
        [
            Row(
                [
                    ("mybucket[]", "assets1", "asset1", {"id": "asset1"}),
                    ("mybucket[]", "assets2", "asset1", {"id": "asset1"}),
                ],
                table=A,
                row={"id": "asset1"},
            )
        ],
    ),
    Case(
        SR + "null bucket definition",
        "bucket_definitions:\n  mybucket:\n",
        error="mybucket.*(must be|expected) a mapping|mybucket.*object",
    ),
    Case(
        SR + "dangerous query errors",
        "bucket_definitions:\n  mybucket:\n    parameters: SELECT request.parameters() ->> 'project_id' as project_id\n    data: []\n",
        [Warnings(["client parameters"])],
    ),
    Case(
        SR + "dangerous query errors - ignored",
        "bucket_definitions:\n  mybucket:\n    accept_potentially_dangerous_queries: true\n"
        "    parameters: SELECT request.parameters() ->> 'project_id' as project_id\n    data: []\n",
        [Warnings([])],
    ),
    Case(
        SR + "priorities on queries",
        """
bucket_definitions:
  highprio:
    parameters: SELECT 0 as _priority;
    data:
      - SELECT * FROM assets WHERE count <= 10;
  defaultprio:
    data:
      - SELECT * FROM assets WHERE count > 10;
""",
        [Warnings([]), Request([("highprio[]", 0), ("defaultprio[]", 3)])],
    ),
    Case(
        SR + "priorities on bucket",
        """
bucket_definitions:
  highprio:
    priority: 0
    data:
      - SELECT * FROM assets WHERE count <= 10;
  defaultprio:
    data:
      - SELECT * FROM assets WHERE count > 10;
""",
        [Warnings([]), Request([("highprio[]", 0), ("defaultprio[]", 3)])],
    ),
    Case(
        SR + "invalid priority on bucket",
        "bucket_definitions:\n  highprio:\n    priority: instant\n    data:\n      - SELECT * FROM assets WHERE count <= 10;\n",
        error="priority",
    ),
    Case(
        SR + "can't duplicate priority",
        "bucket_definitions:\n  highprio:\n    priority: 1\n    parameters: SELECT 0 as _priority;\n"
        "    data:\n      - SELECT * FROM assets WHERE count <= 10;\n",
        error="priority.*(more than once|multiple)",
    ),
    Case(
        SR + "dynamic bucket definitions list",
        """
bucket_definitions:
  mybucket:
    parameters:
      - SELECT request.user_id() as user_id
      - SELECT id as user_id FROM users WHERE id = request.user_id()
    data: []

  by_list:
    parameters:
      - SELECT id as list_id FROM lists WHERE owner_id = request.user_id()
    data: []

  admin_only:
    parameters:
      - SELECT id as list_id FROM lists WHERE (request.jwt() ->> 'is_admin' IS NULL)
    data: []
""",
        [
            Request([('mybucket["user1"]', 3)], jwt={"sub": "user1"}),
            Request(
                [
                    ('mybucket["user1"]', 3),
                    ('by_list["l1"]', 3),
                    ('admin_only["l1"]', 3),
                    ('admin_only["l2"]', 3),
                ],
                jwt={"sub": "user1"},
                param_rows={
                    "lists": [{"id": "l1", "owner_id": "user1"}, {"id": "l2", "owner_id": "user2"}]
                },
            ),
            Request(
                [('mybucket["user1"]', 3), ('by_list["l1"]', 3)],
                jwt={"sub": "user1", "is_admin": True},
                param_rows={
                    "lists": [{"id": "l1", "owner_id": "user1"}, {"id": "l2", "owner_id": "user2"}]
                },
            ),
        ],
    ),
    Case(
        SR + "event definition smoke test",
        """
bucket_definitions:
  bkt:
    data:
      - SELECT * FROM users

event_definitions:
  write_checkpoints:
    payloads:
      - SELECT user_id, checkpoint, client_id FROM checkpoints
""",
        [Warnings([], ours=["event_definitions are not supported"], diff="event-definitions")],
    ),
]
