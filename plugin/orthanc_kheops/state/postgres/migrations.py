"""The versions of the shared state schema, applied in order by `database.migrate`.

A version is never edited once released: a change is a new version. Times are seconds
since the epoch (double precision), as in the SQLite back-end, so that both back-ends keep
one contract.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "outbox, rules, shares, meta and nodes",
        """
CREATE TABLE meta (
    key   text PRIMARY KEY,
    value jsonb NOT NULL
);
CREATE TABLE instances (
    orthanc_id   text PRIMARY KEY,
    state        text NOT NULL CHECK (state IN ('pending', 'inflight', 'sent', 'failed')),
    size         bigint NOT NULL DEFAULT 0,
    sop_uid      text,
    attempts     integer NOT NULL DEFAULT 0,
    queued_at    double precision NOT NULL,
    next_attempt double precision NOT NULL,
    alone        boolean NOT NULL DEFAULT false,
    restored     boolean NOT NULL DEFAULT false,
    last_error   text,
    done_at      double precision,
    lease_node   text,
    lease_until  double precision,
    claim_ends   double precision
);
CREATE INDEX instances_due ON instances (state, next_attempt);
CREATE INDEX instances_leased ON instances (lease_node) WHERE state = 'inflight';
CREATE INDEX instances_done ON instances (state, done_at);
CREATE TABLE rules (
    name              text PRIMARY KEY,
    origin            text NOT NULL CHECK (origin IN ('config', 'api')),
    document          jsonb NOT NULL,
    destination_album text,
    source_album      text,
    failing           text,
    failing_since     double precision,
    last_error        text,
    last_error_at     double precision,
    created_at        double precision NOT NULL,
    updated_at        double precision NOT NULL
);
CREATE TABLE shares (
    rule         text NOT NULL REFERENCES rules (name) ON DELETE CASCADE,
    study_uid    text NOT NULL,
    series_uid   text NOT NULL,
    state        text NOT NULL CHECK (state IN ('pending', 'shared', 'failed')),
    attempts     integer NOT NULL DEFAULT 0,
    not_found    integer NOT NULL DEFAULT 0,
    queued_at    double precision NOT NULL,
    next_attempt double precision NOT NULL,
    last_error   text,
    done_at      double precision,
    lease_node   text,
    lease_until  double precision,
    PRIMARY KEY (rule, series_uid)
);
CREATE INDEX shares_due ON shares (state, next_attempt);
CREATE TABLE nodes (
    name         text PRIMARY KEY,
    started_at   double precision NOT NULL,
    last_seen    double precision NOT NULL,
    last_sent_at double precision,
    stopped_at   double precision,
    rules_version bigint
);
""",
    ),
    Migration(
        2,
        "what each share was decided under",
        """
ALTER TABLE shares ADD COLUMN condition text;
ALTER TABLE shares ADD COLUMN destination text;
ALTER TABLE shares ADD COLUMN instance_id text;
""",
    ),
    Migration(
        3,
        "where each queued file is in Orthanc's storage folder",
        """
ALTER TABLE instances ADD COLUMN file_uuid text;
""",
    ),
)
