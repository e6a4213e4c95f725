ALTER TABLE allocations DROP COLUMN ready;
ALTER TABLE allocations DROP COLUMN replica_group;
ALTER TABLE gpus DROP COLUMN used_outside_bytes;
