-- Workers and their GPUs, as agents registered them.
CREATE TABLE workers (
    id TEXT PRIMARY KEY,
    labels JSONB NOT NULL DEFAULT '{}'::jsonb,
    -- False once heartbeats stop (unreachable) or while draining: never chosen by the fit.
    schedulable BOOLEAN NOT NULL DEFAULT TRUE,
    last_heartbeat TIMESTAMPTZ NOT NULL DEFAULT now(),
    registered_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE gpus (
    worker_id TEXT NOT NULL REFERENCES workers (id),
    idx INTEGER NOT NULL CHECK (idx >= 0),
    name TEXT NOT NULL,
    uuid TEXT NOT NULL DEFAULT '',
    total_bytes BIGINT NOT NULL CHECK (total_bytes >= 0),
    system_reserved_bytes BIGINT NOT NULL DEFAULT 0 CHECK (system_reserved_bytes >= 0),
    -- Sum of allocations.bytes on this GPU, maintained by the same transactions.
    reserved_bytes BIGINT NOT NULL DEFAULT 0 CHECK (reserved_bytes >= 0),
    PRIMARY KEY (worker_id, idx),
    -- The no-overcommit invariant, enforced by the database as the last line of defence
    -- behind the conditional reservation.
    CONSTRAINT gpus_no_overcommit CHECK (reserved_bytes + system_reserved_bytes <= total_bytes)
);

CREATE TABLE instances (
    id TEXT PRIMARY KEY,
    -- The latest start command's spec (NULL if the instance was only ever stopped).
    spec JSONB,
    desired TEXT NOT NULL CHECK (desired IN ('running', 'stopped')),
    state TEXT NOT NULL CHECK (state IN ('analyzing', 'pending', 'scheduled', 'starting',
                                         'running', 'stopping', 'stopped', 'error')),
    reason TEXT,
    -- JetStream sequence of the latest applied command: older commands are stale.
    cmd_seq BIGINT NOT NULL,
    -- Bumped by every command; placements and agent reports must name the current one.
    version BIGINT NOT NULL,
    -- Worker of the current placement.
    worker_id TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX instances_by_state ON instances (state);

-- VRAM held for an instance on a GPU, by the version that placed it. An instance being
-- replaced may briefly hold the old version's allocation (until its agent confirms the stop)
-- next to the new one.
CREATE TABLE allocations (
    instance_id TEXT NOT NULL REFERENCES instances (id),
    worker_id TEXT NOT NULL,
    gpu_idx INTEGER NOT NULL,
    version BIGINT NOT NULL,
    bytes BIGINT NOT NULL CHECK (bytes > 0),
    PRIMARY KEY (instance_id, worker_id, gpu_idx, version),
    FOREIGN KEY (worker_id, gpu_idx) REFERENCES gpus (worker_id, idx)
);

CREATE INDEX allocations_by_gpu ON allocations (worker_id, gpu_idx);
