-- Memory on each GPU in use by processes berth did not start, as the worker's agent last
-- reported it. Placements leave it alone; it is not part of the no-overcommit CHECK because
-- it can grow at any time outside berth's control.
ALTER TABLE gpus
    ADD COLUMN used_outside_bytes BIGINT NOT NULL DEFAULT 0 CHECK (used_outside_bytes >= 0);

-- The replica group of the instance an allocation belongs to: the spread policy keeps a
-- group's replicas on different workers.
ALTER TABLE allocations ADD COLUMN replica_group TEXT;

-- For an instance spread over several workers: this worker's part reported running. The
-- instance is running once every part is.
ALTER TABLE allocations ADD COLUMN ready BOOLEAN NOT NULL DEFAULT FALSE;
