-- Outbox positions are assigned by the insert itself (runyard.common.outbox:
-- pos = writing transaction id << 20 | event number), no longer by a
-- sequencer updating each row. Rows written before this migration that were
-- never sequenced get positions after every sequenced one, in id order;
-- positions from transaction ids are larger than any of them.
UPDATE gateway.outbox o SET pos = base.m + todo.rn
FROM (SELECT coalesce(max(pos), 0) AS m FROM gateway.outbox) base,
     (SELECT id, row_number() OVER (ORDER BY id) AS rn FROM gateway.outbox WHERE pos IS NULL) todo
WHERE o.id = todo.id;
ALTER TABLE gateway.outbox ALTER COLUMN pos SET NOT NULL;
DROP INDEX gateway.outbox_unsequenced;
