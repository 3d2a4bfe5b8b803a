-- An outbox written by the first release (schema version 1), dumped with sqlite3 iterdump.
-- Made by the outbox.py of that release: rows in every state, a retry counter, a reconciler position.
BEGIN TRANSACTION;
CREATE TABLE instances (
    orthanc_id   TEXT PRIMARY KEY,
    state        TEXT NOT NULL CHECK (state IN ('pending', 'inflight', 'sent', 'failed')),
    size         INTEGER NOT NULL DEFAULT 0,
    sop_uid      TEXT,
    attempts     INTEGER NOT NULL DEFAULT 0,
    queued_at    REAL NOT NULL,
    next_attempt REAL NOT NULL,
    alone        INTEGER NOT NULL DEFAULT 0,
    restored     INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT,
    done_at      REAL
);
INSERT INTO "instances" VALUES('sent','sent',1000,'1.2.3.1',1,1700000000.0,1700000000.0,0,0,NULL,1700000010.0);
INSERT INTO "instances" VALUES('failed','failed',2000,'1.2.3.2',1,1700000001.0,1700000001.0,0,0,'KHEOPS refused it: not authorized (292)',1700000010.0);
INSERT INTO "instances" VALUES('retrying','pending',3000,NULL,1,1700000002.0,1700000070.0,0,0,'KHEOPS answered 503',NULL);
INSERT INTO "instances" VALUES('inflight','inflight',4000,NULL,0,1700000003.0,1700000003.0,0,0,NULL,NULL);
INSERT INTO "instances" VALUES('pending-stored','pending',524288,NULL,0,1700000005.0,1700000005.0,0,0,NULL,NULL);
INSERT INTO "instances" VALUES('pending-reconciled','pending',0,NULL,0,1700000006.0,1700000006.0,0,0,NULL,NULL);
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
INSERT INTO "meta" VALUES('schema_version','1');
INSERT INTO "meta" VALUES('retries','1');
INSERT INTO "meta" VALUES('last_change','42');
CREATE INDEX instances_due ON instances (state, next_attempt);
COMMIT;
