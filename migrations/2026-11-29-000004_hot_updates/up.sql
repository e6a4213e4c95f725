-- Cheaper writes on the placement path (`berth bench place`).

-- Instances change state three or four times per placement. An index on `state` made every
-- one of those a non-HOT update (a new entry in every index of the table), and gave the
-- planner a path it misjudged with stale statistics: scanning every `analyzing` or
-- `scheduled` row instead of looking up a few ids. The sweeper's and `ps`'s queries by state
-- scan the table instead; they run every few seconds, not per placement.
DROP INDEX instances_by_state;

-- Room on each page for the new version of an updated row, so that updates stay HOT.
ALTER TABLE instances SET (fillfactor = 80);
ALTER TABLE gpus SET (fillfactor = 50);

-- The outbox trigger, once per statement instead of once per row: a grouped commit or
-- report changes dozens of instances in one statement, and a PL/pgSQL call per row was
-- about half of such a statement's time. Transition tables hold the statement's rows; a
-- trigger with them can only have one event, hence one function and trigger per event.
DROP TRIGGER instances_event_outbox ON instances;
DROP FUNCTION berth_event_outbox();

-- `changed` holds the rows to record; the GPUs are part of the `scheduled` event only
-- (docs/protocol.md). AFTER triggers run at the end of the statement, so a placement's
-- allocations, written by the same statement, are visible here.
CREATE FUNCTION berth_event_outbox_insert() RETURNS trigger AS $$
BEGIN
    INSERT INTO event_outbox (instance_id, state, version, cmd_seq, worker_id, gpus, reason)
    SELECT n.id, n.state, n.version, n.cmd_seq, n.worker_id,
           CASE WHEN n.state = 'scheduled' THEN
               COALESCE((SELECT array_agg(a.gpu_idx ORDER BY a.gpu_idx) FROM allocations a
                         WHERE a.instance_id = n.id AND a.version = n.version
                           AND a.worker_id = n.worker_id), '{}')
           ELSE '{}' END,
           n.reason
    FROM changed n
    ORDER BY n.id;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE FUNCTION berth_event_outbox_update() RETURNS trigger AS $$
BEGIN
    INSERT INTO event_outbox (instance_id, state, version, cmd_seq, worker_id, gpus, reason)
    SELECT n.id, n.state, n.version, n.cmd_seq, n.worker_id,
           CASE WHEN n.state = 'scheduled' THEN
               COALESCE((SELECT array_agg(a.gpu_idx ORDER BY a.gpu_idx) FROM allocations a
                         WHERE a.instance_id = n.id AND a.version = n.version
                           AND a.worker_id = n.worker_id), '{}')
           ELSE '{}' END,
           n.reason
    FROM changed n JOIN before o ON o.id = n.id
    WHERE n.state IS DISTINCT FROM o.state OR n.version IS DISTINCT FROM o.version
    ORDER BY n.id;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER instances_event_outbox_insert
    AFTER INSERT ON instances REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION berth_event_outbox_insert();

CREATE TRIGGER instances_event_outbox_update
    AFTER UPDATE ON instances REFERENCING OLD TABLE AS before NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION berth_event_outbox_update();
