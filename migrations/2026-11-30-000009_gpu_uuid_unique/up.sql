-- One GPU belongs to one worker: a UUID (where the agent knows one) is registered once.
-- Registration refuses a second claim in words (`berth_store::workers`); this index is the
-- guard behind it. Duplicates left by older versions keep their first registration's UUID.
UPDATE gpus SET uuid = ''
WHERE uuid <> ''
  AND (worker_id, idx) NOT IN (
      SELECT DISTINCT ON (uuid) worker_id, idx FROM gpus
      WHERE uuid <> '' ORDER BY uuid, worker_id, idx
  );
CREATE UNIQUE INDEX gpus_uuid_unique ON gpus (uuid) WHERE uuid <> '';
