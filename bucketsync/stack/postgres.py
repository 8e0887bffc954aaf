"""The CDC source's database: a PostgreSQL cluster with logical decoding, and ``psql``.

Owns finding (or apt-installing) the server binaries (15+: publications ``FOR TABLES IN
SCHEMA``), ``initdb`` once, running as the ``postgres`` system user when we are root (initdb
refuses root; if that user cannot enter the state dir, data and socket move to the temp dir),
the server's settings (:data:`PG_SETTINGS`), the fixed roles/database/publication created on
every ``up`` (:func:`_bootstrap`), and :func:`psql` for everyone else (demo, benchmarks,
tests). The connector that reads this cluster is ``bucketsync.stack.connector``'s.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bucketsync.config import Settings
from bucketsync.errors import UserError
from bucketsync.stack.binaries import SourceUnavailable, find_or_install
from bucketsync.stack.component import Component, Launch
from bucketsync.stack.console import say
from bucketsync.stack.layout import layout_for
from bucketsync.stack.ports import HOST
from bucketsync.stack.processes import Service, cmdline, run_once

INITDB_TIMEOUT_S = 180.0
PG_DATABASE = "app"
PG_SUPERUSER = "postgres"
#: role the applications write with (owns database ``app`` and its tables)
PG_APP_USER = ("app", "app")
#: role the connector logs in with: REPLICATION, member of ``app`` (so it may read its tables)
PG_CDC_USER = ("debezium", "debezium")
#: publication created by ``stack up`` for every table of schema ``public`` (PostgreSQL 15+:
#: tables created later are included too); the connector uses it, autocreate disabled.
PG_PUBLICATION = "bucketsync_app"
PG_HEARTBEAT_TABLE = "bucketsync_heartbeat"
PG_MIN_MAJOR = 15
PG_SETTINGS = {
    "wal_level": "logical",
    "max_replication_slots": "20",
    "max_wal_senders": "20",
    "wal_sender_timeout": "60s",
    "logging_collector": "off",
    "log_min_messages": "warning",
    "log_line_prefix": "%m [%p] ",
}
_PG_FIX = (
    "install the PostgreSQL server (Debian/Ubuntu: apt-get install -y postgresql; "
    "macOS: brew install postgresql@16)"
)


def postgres_dsn(settings: Settings, user: str = PG_APP_USER[0]) -> str:
    """libpq URL of database ``app`` (password included: a local dev cluster)."""
    password = dict([PG_APP_USER, PG_CDC_USER]).get(user, "")
    auth = f"{user}:{password}" if password else user
    return f"postgresql://{auth}@{HOST}:{settings.stack.postgres_port}/{PG_DATABASE}"


# --------------------------------------------------------------------------- binaries


def pg_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<major>/bin`` with the server binaries, else ``PATH``."""
    need = ("postgres", "initdb", "psql")

    def complete(d: Path) -> bool:
        return all(os.access(d / b, os.X_OK) and (d / b).is_file() for b in need)

    found: list[tuple[int, Path]] = []
    for d in Path("/usr/lib/postgresql").glob("*/bin"):
        if d.parent.name.isdigit() and complete(d):
            found.append((int(d.parent.name), d))
    if found:
        return max(found)[1]
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10
            )
            d = Path(out.stdout.strip())
            if out.returncode == 0 and complete(d):
                return d
    server = shutil.which("postgres")
    if server and complete(Path(server).parent):
        return Path(server).parent
    return None


def parse_pg_major(text: str) -> int | None:
    """Major version from ``postgres --version`` (``postgres (PostgreSQL) 15.18 (Debian…)`` -> 15)."""
    m = re.search(r"\(PostgreSQL\)\s+(\d+)", text) or re.search(r"\b(\d+)(?:\.\d+)?", text)
    return int(m.group(1)) if m else None


def _check_version(bindir: Path) -> int:
    try:
        out = subprocess.run(
            [str(bindir / "postgres"), "--version"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise SourceUnavailable(
            f"could not run {bindir / 'postgres'} --version ({exc}); {_PG_FIX}"
        ) from None
    major = parse_pg_major(out.stdout + out.stderr)
    if major is None or major < PG_MIN_MAJOR:
        raise SourceUnavailable(
            f"{bindir / 'postgres'} is PostgreSQL {major or '?'}; the CDC source needs "
            f"{PG_MIN_MAJOR}+ (publications FOR TABLES IN SCHEMA); {_PG_FIX}"
        )
    return major


# --------------------------------------------------------------------------- system user and paths


def _pg_user() -> tuple[int, int] | None:
    """(uid, gid) to run PostgreSQL as: ``postgres`` when we are root (initdb refuses root)."""
    if os.geteuid() != 0:
        return None
    try:
        pw = pwd.getpwnam(PG_SUPERUSER)
    except KeyError:
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        say(f"postgres: creating the system user {PG_SUPERUSER!r} (initdb refuses to run as root)")
        try:
            subprocess.run(
                [useradd, "--system", "--user-group", "--no-create-home",
                 "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", PG_SUPERUSER],
                check=True, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            pw = pwd.getpwnam(PG_SUPERUSER)
        except (OSError, subprocess.SubprocessError, KeyError) as exc:
            raise UserError(
                f"PostgreSQL refuses to run as root and the system user {PG_SUPERUSER!r} could not "
                f"be created ({exc}); create it (useradd --system postgres) or run as a non-root user"
            ) from None
    return pw.pw_uid, pw.pw_gid


def _unreachable_by(path: Path, uid: int, gid: int) -> Path | None:
    """The first directory on the way to ``path`` that ``uid`` may not enter, if any."""
    for d in [*reversed(path.parents), path]:
        try:
            st = d.stat()
        except OSError:
            return d
        if st.st_uid == uid:
            bit = stat.S_IXUSR
        elif st.st_gid == gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return d
    return None


def _state_tag(settings: Settings) -> str:
    return hashlib.sha256(str(layout_for(settings).root).encode()).hexdigest()[:10]


def pg_home(settings: Settings) -> Path:
    """Where PostgreSQL's own files (``data/``, ``run/``) live: ``<state_dir>/postgres``.

    When we are root, PostgreSQL runs as the ``postgres`` system user; if that user cannot
    enter the state dir (e.g. a checkout under a 0700 home), a directory under the system's
    temp dir, named after the state dir, is used instead (pid file and log stay put).
    """
    lay = layout_for(settings)
    if os.geteuid() != 0:
        return lay.pg_dir
    try:
        pw = pwd.getpwnam(PG_SUPERUSER)
    except KeyError:
        return lay.pg_dir
    if not lay.root.exists() or _unreachable_by(lay.root, pw.pw_uid, pw.pw_gid) is None:
        return lay.pg_dir
    return Path(tempfile.gettempdir()) / f"bucketsync-pg-{_state_tag(settings)}"


def pg_data(settings: Settings) -> Path:
    return pg_home(settings) / "data"


def pg_socket_dir(settings: Settings) -> Path:
    """``<home>/run``, or a short dir under the temp dir when that path is too long for a socket."""
    run = pg_home(settings) / "run"
    if len(str(run / f".s.PGSQL.{settings.stack.postgres_port}.lock")) <= 100:
        return run
    return Path(tempfile.gettempdir()) / f"bucketsync-pgsock-{_state_tag(settings)}"


def _own(path: Path, user: tuple[int, int] | None, mode: int | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if mode is not None:
        path.chmod(mode)
    if user is not None:
        os.chown(path, *user)


# --------------------------------------------------------------------------- psql


def _clean_env() -> dict[str, str]:
    """The environment without libpq's PG* variables (they would redirect psql)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {
        "PGCONNECT_TIMEOUT": "5"
    }


def psql_argv(
    settings: Settings, *, user: str = PG_APP_USER[0], database: str = PG_DATABASE
) -> tuple[list[str], dict[str, str]]:
    """``psql`` command line and environment for the stack's PostgreSQL.

    The superuser (``postgres``) connects over the Unix socket (trust); other roles over TCP
    with their password. Unaligned tuples-only output, stop on the first error.
    """
    bindir = pg_bindir()
    if bindir is None:
        raise SourceUnavailable(f"psql not found; {_PG_FIX}")
    env = _clean_env()
    port = str(settings.stack.postgres_port)
    if user == PG_SUPERUSER:
        host = str(pg_socket_dir(settings))
    else:
        host = HOST
        env["PGPASSWORD"] = dict([PG_APP_USER, PG_CDC_USER]).get(user, "")
    argv = [
        str(bindir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
        "-h", host, "-p", port, "-U", user, "-d", database,
    ]  # fmt: skip
    return argv, env


def psql(
    settings: Settings,
    sql: str,
    *,
    user: str = PG_APP_USER[0],
    database: str = PG_DATABASE,
    timeout: float = 60.0,
) -> str:
    """Run ``sql`` (a script: statements run one by one) and return its output; raise on errors."""
    argv, env = psql_argv(settings, user=user, database=database)
    try:
        res = subprocess.run(
            argv, input=sql, capture_output=True, text=True, env=env, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        raise UserError(f"psql as {user} on {database} timed out after {timeout:.0f} s") from None
    if res.returncode != 0:
        err = [ln for ln in res.stderr.splitlines() if ln.strip()]
        raise UserError(
            f"psql as {user} on {database} failed: {' / '.join(err[-3:]) or res.returncode}"
        )
    return res.stdout


def _bootstrap(settings: Settings) -> None:
    """Roles, database ``app`` and the publication; idempotent, run on every ``up``."""
    (app, app_pw), (cdc, cdc_pw) = PG_APP_USER, PG_CDC_USER
    su = PG_SUPERUSER
    psql(
        settings,
        f"""
        DO $$ BEGIN
          IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{app}') THEN
            CREATE ROLE {app} LOGIN PASSWORD '{app_pw}';
          END IF;
          IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{cdc}') THEN
            CREATE ROLE {cdc} LOGIN REPLICATION PASSWORD '{cdc_pw}' IN ROLE {app};
          END IF;
        END $$;
        """,
        user=su,
        database="postgres",
    )
    have_db = psql(
        settings, f"SELECT 1 FROM pg_database WHERE datname = '{PG_DATABASE}'", user=su,
        database="postgres",
    ).strip()  # fmt: skip
    if not have_db:
        psql(settings, f"CREATE DATABASE {PG_DATABASE} OWNER {app}", user=su, database="postgres")
    # written by the connector's heartbeat.action.query: a change inside the publication every
    # heartbeat, so the slot's confirmed LSN advances even while only other tables change
    psql(
        settings,
        f"CREATE TABLE IF NOT EXISTS public.{PG_HEARTBEAT_TABLE} (id integer PRIMARY KEY, ts timestamptz)",
    )
    psql(
        settings,
        f"""
        DO $$ BEGIN
          IF NOT EXISTS (SELECT FROM pg_publication WHERE pubname = '{PG_PUBLICATION}') THEN
            CREATE PUBLICATION {PG_PUBLICATION} FOR TABLES IN SCHEMA public;
          END IF;
        END $$;
        """,
        user=su,
    )


def slot_lag_bytes(settings: Settings, slot: str) -> int | None:
    """WAL bytes the connector has not yet confirmed on replication slot ``slot`` (None if absent)."""
    if not re.fullmatch(r"[a-z0-9_]+", slot):
        raise UserError(f"replication slot name {slot!r} must be lower-case letters, digits, _")
    out = psql(
        settings,
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint "
        f"FROM pg_replication_slots WHERE slot_name = '{slot}'",
        user=PG_SUPERUSER,
        timeout=10,
    ).strip()
    return int(out) if out.lstrip("-").isdigit() else None


# --------------------------------------------------------------------------- component


@dataclass(frozen=True)
class PgPlan:
    """What PostgreSQL's preflight found: the server binaries and the user to run them as."""

    bindir: Path
    user: tuple[int, int] | None


class Postgres(Component[PgPlan]):
    name = "postgres"

    def service(self, settings: Settings) -> Service:
        lay = layout_for(settings)

        def owns(pid: int) -> bool:
            # the postmaster keeps its argv; its data dir's postmaster.pid names it
            data = pg_data(settings)
            try:
                first = (data / "postmaster.pid").read_text().split("\n", 1)[0].strip()
            except OSError:
                first = ""
            return first == str(pid) and str(data) in cmdline(pid)

        address = f"{HOST}:{settings.stack.postgres_port}"
        return Service(self.name, address, lay.pg_pid, lay.pg_log, owns, signal.SIGINT)

    def ports(self, settings: Settings) -> list[tuple[int, str]]:
        return [(settings.stack.postgres_port, "postgres_port")]

    def preflight(self, settings: Settings) -> PgPlan:
        bindir = find_or_install(pg_bindir, "postgresql", self.name, "server binaries")
        if bindir is None:
            raise SourceUnavailable(
                "PostgreSQL server binaries (postgres, initdb, psql) not found in "
                f"/usr/lib/postgresql/*/bin or on PATH; {_PG_FIX}, then run "
                "`bucketsync stack up --source postgres` again"
            )
        _check_version(bindir)
        return PgPlan(bindir, _pg_user())

    def prepare(self, settings: Settings, plan: PgPlan) -> None:
        """``initdb`` once (into a temporary dir, renamed when complete), socket dir, ownership."""
        lay, user = layout_for(settings), plan.user
        lay.pg_dir.mkdir(parents=True, exist_ok=True)
        home, data = pg_home(settings), pg_data(settings)
        if home != lay.pg_dir and user is not None:
            blocked = _unreachable_by(lay.root, *user)
            say(
                f"postgres: the {PG_SUPERUSER} system user cannot enter {blocked} (PostgreSQL runs "
                f"as that user: initdb refuses root), so its data lives in {home}"
            )
            _own(home, user, 0o700)
        _own(lay.pg_dir if home == lay.pg_dir else home, user)
        _own(pg_socket_dir(settings), user, 0o755)
        version_file = data / "PG_VERSION"
        if version_file.exists():
            have = version_file.read_text().strip()
            want = str(_check_version(plan.bindir))
            if have != want:
                raise UserError(
                    f"the PostgreSQL data in {data} was made by PostgreSQL {have}, the binaries in "
                    f"{plan.bindir} are {want}; run `bucketsync stack reset` (deletes the stack's data)"
                )
            return
        tmp = home / "data.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        say(f"postgres: initdb {data} (once)...")
        cmd = [
            str(plan.bindir / "initdb"), "-D", str(tmp), "-U", PG_SUPERUSER, "-E", "UTF8",
            "--no-locale", "--auth-local=trust", "--auth-host=scram-sha-256", "--no-instructions",
        ]  # fmt: skip
        try:
            run_once("postgres: initdb", cmd, cwd=home, timeout=INITDB_TIMEOUT_S, user=user)
        except UserError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        tmp.rename(data)

    def command(self, settings: Settings, plan: PgPlan) -> Launch:
        opts = {
            "port": str(settings.stack.postgres_port),
            "listen_addresses": HOST,
            "unix_socket_directories": str(pg_socket_dir(settings)),
            **PG_SETTINGS,
        }
        argv = [str(plan.bindir / "postgres"), "-D", str(pg_data(settings))]
        for key, value in opts.items():
            argv += ["-c", f"{key}={value}"]
        return Launch(argv, pg_home(settings), plan.user)

    def ready(self, settings: Settings) -> bool:
        try:
            out = psql(settings, "SELECT 1", user=PG_SUPERUSER, database="postgres", timeout=10)
        except UserError:
            return False
        return out.strip() == "1"

    def configure(self, settings: Settings) -> None:
        _bootstrap(settings)

    def addresses(self, settings: Settings) -> dict[str, str]:
        return {self.name: postgres_dsn(settings)}

    def data(self, settings: Settings) -> list[Path]:
        return [pg_data(settings)]


POSTGRES = Postgres()
