-- Agents run real model servers: a running instance has an endpoint (host:port, as its
-- agent reported it), and a server the agent restarted after a failure counts its restarts.
-- Both travel with the instance's events.
ALTER TABLE instances ADD COLUMN endpoint TEXT,
                      ADD COLUMN restarts INTEGER NOT NULL DEFAULT 0 CHECK (restarts >= 0);
ALTER TABLE event_outbox ADD COLUMN endpoint TEXT,
                         ADD COLUMN restarts INTEGER NOT NULL DEFAULT 0;

CREATE OR REPLACE FUNCTION berth_event_outbox_insert() RETURNS trigger AS $$
BEGIN
    INSERT INTO event_outbox (instance_id, state, version, cmd_seq, worker_id, gpus, reason,
                              endpoint, restarts)
    SELECT n.id, n.state, n.version, n.cmd_seq, n.worker_id,
           CASE WHEN n.state = 'scheduled' THEN
               COALESCE((SELECT array_agg(a.gpu_idx ORDER BY a.gpu_idx) FROM allocations a
                         WHERE a.instance_id = n.id AND a.version = n.version
                           AND a.worker_id = n.worker_id), '{}')
           ELSE '{}' END,
           n.reason, n.endpoint, n.restarts
    FROM changed n
    ORDER BY n.id;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

-- A restart is a change of its own (running → starting with one more restart), and so is
-- the endpoint a server answers on once it runs again.
CREATE OR REPLACE FUNCTION berth_event_outbox_update() RETURNS trigger AS $$
BEGIN
    INSERT INTO event_outbox (instance_id, state, version, cmd_seq, worker_id, gpus, reason,
                              endpoint, restarts)
    SELECT n.id, n.state, n.version, n.cmd_seq, n.worker_id,
           CASE WHEN n.state = 'scheduled' THEN
               COALESCE((SELECT array_agg(a.gpu_idx ORDER BY a.gpu_idx) FROM allocations a
                         WHERE a.instance_id = n.id AND a.version = n.version
                           AND a.worker_id = n.worker_id), '{}')
           ELSE '{}' END,
           n.reason, n.endpoint, n.restarts
    FROM changed n JOIN before o ON o.id = n.id
    WHERE n.state IS DISTINCT FROM o.state OR n.version IS DISTINCT FROM o.version
       OR n.reason IS DISTINCT FROM o.reason OR n.restarts IS DISTINCT FROM o.restarts
    ORDER BY n.id;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

-- An endpoint exists only while the instance runs, and restarts count within one placement:
-- whatever statement moves an instance elsewhere (a stop, an error, an eviction, a new
-- command) clears them here, so none can forget to. The WHEN clause keeps the common update
-- free of a function call.
CREATE FUNCTION berth_instance_runtime() RETURNS trigger AS $$
BEGIN
    IF NEW.state <> 'running' THEN
        NEW.endpoint := NULL;
    END IF;
    IF NEW.version <> OLD.version THEN
        NEW.restarts := 0;
    END IF;
    RETURN NEW;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER instances_runtime BEFORE UPDATE ON instances FOR EACH ROW
    WHEN ((NEW.state <> 'running' AND NEW.endpoint IS NOT NULL)
          OR (NEW.version <> OLD.version AND NEW.restarts <> 0))
    EXECUTE FUNCTION berth_instance_runtime();
