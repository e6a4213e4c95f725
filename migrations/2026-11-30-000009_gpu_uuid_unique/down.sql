DROP INDEX gpus_uuid_unique;
