DROP TRIGGER instances_event_outbox_update ON instances;
DROP TRIGGER instances_event_outbox_insert ON instances;
DROP FUNCTION berth_event_outbox_update();
DROP FUNCTION berth_event_outbox_insert();

CREATE FUNCTION berth_event_outbox() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'INSERT'
       OR NEW.state IS DISTINCT FROM OLD.state
       OR NEW.version IS DISTINCT FROM OLD.version THEN
        INSERT INTO event_outbox (instance_id, state, version, cmd_seq, worker_id, gpus, reason)
        VALUES (
            NEW.id, NEW.state, NEW.version, NEW.cmd_seq, NEW.worker_id,
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

ALTER TABLE gpus RESET (fillfactor);
ALTER TABLE instances RESET (fillfactor);
CREATE INDEX instances_by_state ON instances (state);
