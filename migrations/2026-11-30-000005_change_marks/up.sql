-- Which transaction last wrote each worker and GPU row. An analyzer's capacity view then
-- reads only the rows its previous read could not see (`pg_visible_in_snapshot` against the
-- snapshot of that read) instead of every GPU of the cluster each second: the cost of a
-- refresh follows what changed, not the size of the cluster.
--
-- A trigger rather than an assignment in each statement, so no update can forget it. The
-- columns have no index: a refresh tests each row with a cheap function, and unindexed the
-- updates of `gpus` stay HOT (migration 000004).
ALTER TABLE workers ADD COLUMN changed_xid xid8 NOT NULL DEFAULT pg_current_xact_id();
ALTER TABLE gpus ADD COLUMN changed_xid xid8 NOT NULL DEFAULT pg_current_xact_id();

-- pg_current_xact_id() is the top-level transaction's id, in a savepoint too.
CREATE FUNCTION berth_mark_changed() RETURNS trigger AS $$
BEGIN
    NEW.changed_xid := pg_current_xact_id();
    RETURN NEW;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER workers_mark_changed BEFORE UPDATE ON workers
    FOR EACH ROW EXECUTE FUNCTION berth_mark_changed();
CREATE TRIGGER gpus_mark_changed BEFORE UPDATE ON gpus
    FOR EACH ROW EXECUTE FUNCTION berth_mark_changed();
