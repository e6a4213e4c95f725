DROP TRIGGER instances_runtime ON instances;
DROP FUNCTION berth_instance_runtime();

CREATE OR REPLACE FUNCTION berth_event_outbox_insert() RETURNS trigger AS $$
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

CREATE OR REPLACE FUNCTION berth_event_outbox_update() RETURNS trigger AS $$
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
       OR n.reason IS DISTINCT FROM o.reason
    ORDER BY n.id;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

ALTER TABLE event_outbox DROP COLUMN endpoint, DROP COLUMN restarts;
ALTER TABLE instances DROP COLUMN endpoint, DROP COLUMN restarts;
