DROP TRIGGER instances_event_outbox ON instances;
DROP FUNCTION berth_event_outbox();
DROP TABLE event_outbox;
