-- Every state change of an instance, written by the same transaction that made it, until an
-- analyzer has published it to BERTH_EVENTS: an event can no longer be lost between a
-- commit and a crash.
CREATE TABLE event_outbox (
    seq BIGSERIAL PRIMARY KEY,
    instance_id TEXT NOT NULL,
    state TEXT NOT NULL,
    version BIGINT NOT NULL,
    cmd_seq BIGINT NOT NULL,
    worker_id TEXT,
    gpus INTEGER[] NOT NULL DEFAULT '{}',
    reason TEXT,
    at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);

-- A trigger rather than an insert in each statement: no transition can forget it. AFTER
-- ROW triggers run at the end of the statement, so a placement's allocations, written by
-- the same statement, are visible here.
CREATE FUNCTION berth_event_outbox() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'INSERT'
       OR NEW.state IS DISTINCT FROM OLD.state
       OR NEW.version IS DISTINCT FROM OLD.version THEN
        INSERT INTO event_outbox (instance_id, state, version, cmd_seq, worker_id, gpus, reason)
        VALUES (
            NEW.id, NEW.state, NEW.version, NEW.cmd_seq, NEW.worker_id,
            -- GPUs are part of the `scheduled` event only (docs/protocol.md).
            CASE WHEN NEW.state = 'scheduled' THEN
                COALESCE((SELECT array_agg(gpu_idx ORDER BY gpu_idx) FROM allocations
                          WHERE instance_id = NEW.id AND version = NEW.version
                            AND worker_id = NEW.worker_id), '{}')
            ELSE '{}' END,
            NEW.reason);
    END IF;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER instances_event_outbox
    AFTER INSERT OR UPDATE ON instances
    FOR EACH ROW EXECUTE FUNCTION berth_event_outbox();
