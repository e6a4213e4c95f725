DROP TRIGGER gpus_mark_changed ON gpus;
DROP TRIGGER workers_mark_changed ON workers;
DROP FUNCTION berth_mark_changed();
ALTER TABLE gpus DROP COLUMN changed_xid;
ALTER TABLE workers DROP COLUMN changed_xid;
